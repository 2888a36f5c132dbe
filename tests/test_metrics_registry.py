"""The metrics registry: every name a run records is declared once in ``klsweep.metrics``,
and a name that is not stops the run where it is logged, so that the generated metrics
reference lists everything a run writes."""

from __future__ import annotations

import pytest

from klsweep import metrics
from klsweep.metrics import (
    LAST,
    MEAN,
    UndeclaredMetric,
    check_row,
    check_summary,
    find,
    summary_names,
)
from klsweep.records import FINAL_KEYS, summarize


def test_an_undeclared_step_metric_fails_naming_it_and_where_to_declare_it():
    check_row({"step": 0, "kl/mean": 0.1, "reward/mean": 0.5})
    with pytest.raises(UndeclaredMetric, match=r"'kl/made_up'.*klsweep/metrics.py"):
        check_row({"step": 0, "kl/mean": 0.1, "kl/made_up": 1.0})


def test_an_undeclared_summary_key_fails_and_every_final_value_is_declared():
    check_summary({"status": "completed", "reward/final": 0.6, "kl/beta_final": 0.1,
                   "exact/improvement_left_final": 0.05, "tracking/error": 0.3})
    with pytest.raises(UndeclaredMetric, match="'accuracy_final'"):
        check_summary({"status": "completed", "accuracy_final": 1.0})


def test_a_family_is_one_declaration_matching_one_segment(monkeypatch):
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))
    metrics.step("eval/pass@{k}", "fraction", "pass@k", final=LAST)
    assert find("eval/pass@1").name == find("eval/pass@16").name == "eval/pass@{k}"
    assert find("eval/pass@1/x") is None and find("eval/pass") is None
    check_row({"eval/pass@8": 0.5})
    assert "eval/pass@{k}_final" in summary_names()
    assert summarize([{"eval/pass@8": 0.25}, {"eval/pass@8": 0.5}]) == {"eval/pass@8_final": 0.5}


def test_summary_json_condenses_each_metric_as_declared():
    rows = [{"step": i, "reward/mean": float(i), "kl/beta": 0.1 * i, "exact/kl": float(i),
             "kl/abs": 1.0} for i in range(8)]
    # reward/mean: the mean of the last quarter (steps 6, 7); β and exact/*: the last value;
    # kl/abs: declared with no final value
    assert summarize(rows) == {"reward/final": 6.5, "kl/beta_final": pytest.approx(0.7),
                               "exact/kl_final": 7.0}
    assert set(FINAL_KEYS) == {m.name for m in metrics.METRICS.values() if m.final == MEAN}


def test_every_declaration_says_its_unit_meaning_and_when():
    for metric in [*metrics.METRICS.values(), *metrics.SUMMARY.values()]:
        assert metric.unit and metric.meaning and metric.when, metric.name
        assert metric.final in (None, MEAN, LAST), metric.name
