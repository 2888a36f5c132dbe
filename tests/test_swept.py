"""What a sweep varied, as its jobs show it: the swept keys read as Hydra's sweepers read them
(and as klsweep's Optuna sweeper searches them), each job's values, its run name and W&B tags,
and the sweep console's lines."""

from __future__ import annotations

import functools
import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from hydra_plugins.klsweep_optuna._search_space import parse_search_space
from klsweep.config import CONF_DIR, compose_and_validate
from klsweep.errors import KLDiverged
from klsweep.swept import (
    MAX_TAG,
    SweepJob,
    event_line,
    job_outcome,
    run_tags,
    swept_keys,
    swept_values,
)
from klsweep.train import run_name

PRESETS = sorted(path.stem for path in (CONF_DIR / "sweep").glob("*.yaml"))


@functools.cache
def preset_params(preset: str) -> dict:
    """``hydra.sweeper.params`` of ``-m sweep=PRESET``, as Hydra composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={preset}"], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.sweeper.params)


def test_a_sweep_value_sweeps_its_key_and_a_plain_value_on_the_command_line_fixes_it():
    params = {"kl.beta": "tag(log, interval(0.001, 1.0))", "kl.target": "interval(0.01, 0.5)",
              "steps": 40}  # a number in params is a fixed value
    assert swept_keys(params, []) == ["kl.beta", "kl.target"]
    assert swept_keys(params, ["kl.target=0.05", "task=exact"]) == ["kl.beta"]
    assert swept_keys({}, ["schedule=fixed,adaptive", "seed=range(0,3)", "steps=5",
                           "kl.beta=choice(0.1, 0.3)", "+extra=1,2"]) == [
        "schedule", "seed", "kl.beta", "extra"]
    # params.kl.beta=... on the command line nests beta under kl; a preset writes kl.beta
    assert swept_keys({"kl": {"beta": "choice(0.1, 0.3)"}}, []) == ["kl.beta"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("arguments", [[], ["kl.beta=0.1"], ["optim.lr=choice(1e-4, 3e-4)"]])
def test_the_swept_keys_are_the_keys_the_optuna_sweeper_searches(preset, arguments):
    params = preset_params(preset)
    space = parse_search_space(params, arguments, OverridesParser.create())
    assert swept_keys(params, arguments) == list(space.distributions)


def test_a_job_s_values_are_those_its_overrides_give_the_swept_keys():
    job = ["sweep=divergences", "steps=100", "kl.divergence=js", "kl.beta=0.1",
           "trial.number=3"]
    assert swept_values(job, ["kl.divergence", "kl.beta"]) == {"kl.divergence": "js",
                                                               "kl.beta": 0.1}
    assert swept_values(["schedule=pid", "seed=2"], ["schedule", "seed"]) == {
        "schedule": "pid", "seed": 2}


def test_every_point_of_the_divergences_preset_has_its_own_name_and_tags():
    cfg = compose_and_validate({"sweep": "divergences"})
    space = parse_search_space(preset_params("divergences"), [], OverridesParser.create())
    names, tag_sets = set(), set()
    for divergence, beta in itertools.product(*(d.choices for d in
                                                space.distributions.values())):
        sweep = SweepJob("divergences", {"kl.divergence": divergence, "kl.beta": beta})
        names.add(run_name(cfg, sweep))
        tag_sets.add(tuple(run_tags(sweep.values)))
    assert len(names) == len(tag_sets) == 15
    sweep = SweepJob("divergences", {"kl.divergence": "js", "kl.beta": 0.1})
    assert run_name(cfg, sweep) == "grpo-k1-fixed-s0 divergence=js beta=0.1"
    assert run_tags(sweep.values) == ["kl.divergence=js", "kl.beta=0.1"]


def test_a_single_run_keeps_its_name_and_an_explicit_name_wins():
    cfg = compose_and_validate({})
    assert run_name(cfg) == "grpo-k3-adaptive-s0"
    # the default name shows the algorithm, estimator, schedule and seed: a grid over them
    # adds nothing to it
    assert run_name(cfg, SweepJob("grid", {"schedule": "adaptive", "seed": 0})) == \
        "grpo-k3-adaptive-s0"
    named = compose_and_validate({"name": "baseline"})
    assert run_name(named, SweepJob("grid", {"kl.beta": 0.3})) == "baseline"


def test_names_stay_short_and_tags_within_w_and_b_s_limit():
    cfg = compose_and_validate({})
    # two keys ending alike keep their whole key; a float shows 4 significant digits
    sweep = SweepJob("study", {"kl.reference.mix": 0.123456789, "optim.lr": 3e-4,
                               "algo.mix": 0.5})
    assert run_name(cfg, sweep) == ("grpo-k3-adaptive-s0 kl.reference.mix=0.1235 lr=0.0003 "
                                    "algo.mix=0.5")
    (tag,) = run_tags({"task.prompts": "x" * 100})
    assert len(tag) == MAX_TAG and tag.startswith("task.prompts=xxx")


def test_a_job_s_line_says_how_it_ended_with_its_numbers_or_its_reason():
    values = {"kl.divergence": "js", "kl.beta": 0.1}
    done = JobReturn(status=JobStatus.COMPLETED,
                     _return_value={"reward/final": 0.51234, "kl/final": 0.0123, "name": "x"})
    assert event_line("job", 3, *job_outcome(done), values) == (
        "klsweep: job 3 completed · reward/final=0.5123 kl/final=0.0123 · divergence=js "
        "beta=0.1")
    diverged = JobReturn(status=JobStatus.FAILED,
                         _return_value=KLDiverged("KL 12 exceeded kl.max=10 at step 4"))
    assert job_outcome(diverged) == ("diverged", "KL 12 exceeded kl.max=10 at step 4")
    crashed = JobReturn(status=JobStatus.FAILED, _return_value=ValueError("bad\nvalue"))
    assert job_outcome(crashed) == ("failed", "ValueError: bad")
