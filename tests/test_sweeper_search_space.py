"""The sweeper's search-space grammar, its checks and its discovery by Hydra (no training)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import GridSampler, NSGAIISampler

from hydra_plugins.klsweep_optuna._checks import check_objectives, known_objectives
from hydra_plugins.klsweep_optuna._errors import SweepConfigError
from hydra_plugins.klsweep_optuna._search_space import (
    corner_values,
    grid_values,
    override_string,
    parse_search_space,
)
from hydra_plugins.klsweep_optuna._study import check_pruner, make_sampler

PARSER = OverridesParser.create()


def space(params: dict, arguments: list[str] | None = None):
    return parse_search_space(params, arguments or [], PARSER)


@pytest.mark.parametrize(("text", "expected"), [
    ("interval(0.01, 0.5)", FloatDistribution(0.01, 0.5)),
    ("tag(log, interval(0.001, 1.0))", FloatDistribution(0.001, 1.0, log=True)),
    ("int(interval(1, 8))", IntDistribution(1, 8)),
    ("tag(log, int(interval(1, 64)))", IntDistribution(1, 64, log=True)),
    ("range(0, 10, 3)", IntDistribution(0, 9, step=3)),
    ("range(4)", IntDistribution(0, 3)),
    ("range(0.1, 0.5, 0.1)", FloatDistribution(0.1, 0.4, step=0.1)),
    ("choice(fixed, adaptive)", CategoricalDistribution(["fixed", "adaptive"])),
    ("k1,k2,k3", CategoricalDistribution(["k1", "k2", "k3"])),
    ("choice(1, 2.5, true, abc)", CategoricalDistribution([1, 2.5, True, "abc"])),
])
def test_each_grammar_form_becomes_its_optuna_distribution(text, expected):
    parsed = space({"kl.beta": text})
    assert parsed.distributions == {"kl.beta": expected}
    assert parsed.fixed == []


def test_a_plain_value_is_fixed_for_every_trial_not_searched():
    parsed = space({"kl.beta": "interval(0.01, 0.1)", "steps": 30, "kl.target": "0.05"})
    assert list(parsed.distributions) == ["kl.beta"]
    assert parsed.fixed == ["steps=30", "kl.target=0.05"]


def test_the_command_line_adds_replaces_and_fixes_params():
    parsed = space({"kl.beta": "interval(0.01, 0.1)", "kl.target": "interval(0.01, 0.5)"},
                   ["sweep=beta_target", "kl.beta=tag(log, interval(0.001, 0.01))",
                    "kl.target=0.2", "schedule=fixed,adaptive"])
    assert parsed.distributions == {
        "kl.beta": FloatDistribution(0.001, 0.01, log=True),
        "schedule": CategoricalDistribution(["fixed", "adaptive"])}
    assert parsed.fixed == ["sweep=beta_target", "kl.target=0.2"]


def test_params_nested_by_a_command_line_override_mean_their_dotted_key():
    parsed = space({"kl": {"beta": "interval(0.01, 0.1)"}, "kl.target": "interval(0.1, 0.2)"})
    assert list(parsed.distributions) == ["kl.beta", "kl.target"]


@pytest.mark.parametrize(("text", "message"), [
    ("interval(0.5, 0.5)", "hydra.sweeper.params.kl.beta: interval(0.5, 0.5) is empty"),
    ("interval(0.5, 0.1)", "hydra.sweeper.params.kl.beta: interval(0.5, 0.1) is empty"),
    ("tag(log, interval(0, 1))", "on a log scale must be above 0"),
    ("range(3, 1)", "range(3, 1) is empty"),
    ("choice(a, a)", "repeats a choice"),
    ("shuffle(a, b)", "shuffle has no meaning here"),
    ("tag(grid, interval(0, 1))", "the only tag is log, on an interval"),
    ("interval(0.1", "cannot parse 'kl.beta=interval(0.1'"),
    ("nosuch(1, 2)", "Unknown function 'nosuch'"),
])
def test_a_bad_search_space_fails_with_one_line_naming_the_key(text, message):
    with pytest.raises(SweepConfigError) as caught:
        space({"kl.beta": text})
    assert message in str(caught.value)
    assert str(caught.value).startswith("klsweep: error: ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", [0.001, 1e-05, 3, -2, True, None, "fixed", "a b", "it's",
                                   "true", "1", float("inf"), "sqlite:////tmp/x/optuna.db",
                                   "postgresql://klsweep@127.0.0.1:5432/db"])
def test_an_override_string_parses_back_to_the_value(value):
    line = override_string("kl.beta", value)
    parsed = PARSER.parse_overrides([line])[0]
    assert parsed.key_or_group == "kl.beta"
    assert parsed.value() == value and type(parsed.value()) is type(value)


def test_corners_are_both_ends_or_every_choice_and_grids_list_every_point():
    assert corner_values(FloatDistribution(0.01, 0.5, log=True)) == [0.01, 0.5]
    assert corner_values(IntDistribution(0, 9, step=3)) == [0, 9]
    assert corner_values(CategoricalDistribution(["a", "b", "c"])) == ["a", "b", "c"]
    assert grid_values("seed", IntDistribution(0, 9, step=3)) == [0, 3, 6, 9]
    assert grid_values("x", FloatDistribution(0.1, 0.4, step=0.1)) == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(SweepConfigError, match="sampler grid needs a choice or a range"):
        grid_values("kl.beta", FloatDistribution(0.01, 0.5))


def test_objectives_name_numbers_of_a_run_summary():
    known = known_objectives()
    assert {"reward/final", "kl/final", "kl/seq_final", "kl/beta_final",
            "wall_time_s"} <= set(known)
    assert "exact/improvement_left_final" not in known
    assert {"exact/improvement_left_final", "exact/kl_final", "exact/reward_final",
            "reward/final"} <= set(known_objectives("exact"))
    assert check_objectives({}) == {"reward/final": "maximize"}
    assert check_objectives({"kl/final": "minimize", "reward/final": "maximize"}) == {
        "kl/final": "minimize", "reward/final": "maximize"}
    with pytest.raises(SweepConfigError, match="kl/finale is not a number of a run's summary"):
        check_objectives({"kl/finale": "minimize"})
    with pytest.raises(SweepConfigError, match="must be maximize or minimize"):
        check_objectives({"kl/final": "lower"})


def test_hydra_discovers_the_sweeper_in_the_editable_install():
    # Hydra's scan executes each plugin module anew, so compare classes by their names
    names = {f"{c.__module__}.{c.__qualname__}" for c in Plugins.instance().discover(Sweeper)}
    assert "hydra_plugins.klsweep_optuna.klsweep_optuna_sweeper.KLSweepOptunaSweeper" in names
    assert ConfigStore.instance().repo["hydra"]["sweeper"]["klsweep_optuna.yaml"]
    # the checkout's own source, not a copy in site-packages
    import hydra_plugins.klsweep_optuna as plugin

    src = Path(__file__).resolve().parents[1] / "src"
    assert Path(plugin.__file__).resolve().is_relative_to(src)
    assert not (src / "hydra_plugins" / "__init__.py").exists()  # a namespace package


@pytest.mark.parametrize(("make", "message"), [
    (lambda: check_pruner({"name": "median", "n_warmup": 3}, 1),
     "hydra.sweeper.pruner.n_warmup is not an option of pruner=median (allowed: interval_steps"),
    (lambda: check_pruner({"name": "median"}, 2), "pruner.name=median needs a single objective"),
    (lambda: check_pruner({"name": "patient"}, 1), "pruner.name must be one of none, median"),
    (lambda: make_sampler({"name": "tpe", "n_startup": 3}, {}, 1),
     "hydra.sweeper.sampler.n_startup is not an option of sampler=tpe"),
    (lambda: make_sampler({"name": "cmaes"}, {}, 2), "sampler.name=cmaes optimises one objective"),
    (lambda: make_sampler({"name": "grid"}, {"kl.beta": FloatDistribution(0.01, 0.5)}, 1),
     "hydra.sweeper.params.kl.beta: sampler grid needs a choice or a range"),
])
def test_bad_sampler_and_pruner_settings_fail_with_one_line(make, message):
    with pytest.raises(SweepConfigError, match=re.escape(message)):
        make()


def test_samplers_and_pruners_are_built_with_their_options():
    sampler = make_sampler({"name": "grid", "seed": 0},
                           {"seed": IntDistribution(0, 2), "schedule": CategoricalDistribution(
                               ["fixed", "pid"])}, 2)
    assert isinstance(sampler, GridSampler)
    assert isinstance(make_sampler({"name": "nsgaii", "population_size": 8, "seed": 1}, {}, 2),
                      NSGAIISampler)
    assert check_pruner({"name": "hyperband", "min_resource": 2}, 1) == {
        "name": "hyperband", "min_resource": 2}
