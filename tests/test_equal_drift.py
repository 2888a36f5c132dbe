"""Schedules compared at equal drift (klsweep.report.equal_drift): the interpolation against a
trajectory computed by hand, and the report's table on hand-made runs whose reward is a known
line in their KL."""

import math

import matplotlib.image
import numpy as np
import pytest
from test_report import STEPS, TARGET, write_run

from klsweep.report import main
from klsweep.report.equal_drift import (
    ALPHA,
    reward_at_kl,
    seeds_to_separate,
    separated,
    verdict,
)


def test_reward_is_read_where_the_kl_first_reaches_each_level_interpolated_by_hand():
    kl = [0.0, 0.02, 0.06, 0.04, 0.10]
    reward = [0.5, 0.6, 0.8, 0.7, 0.9]
    levels = [0.0, 0.01, 0.05, 0.06, 0.08, 0.2]
    expected = [
        0.5,                         # reached at the start
        0.5 + 0.5 * (0.6 - 0.5),     # halfway from 0 to 0.02
        0.6 + 0.75 * (0.8 - 0.6),    # (0.05 − 0.02) / (0.06 − 0.02) of the way
        0.8,                         # on a point
        0.7 + (2 / 3) * (0.9 - 0.7),  # first reached after the dip: from 0.04 to 0.10
        math.nan,                    # never reached
    ]
    np.testing.assert_allclose(reward_at_kl(kl, reward, levels), expected, rtol=1e-12)


def test_seeds_separate_two_groups_only_when_every_seed_of_one_is_above_the_other():
    assert separated([0.3, 0.4, 0.5], [0.0, 0.1, 0.2]) == (True, pytest.approx(1 / 20))
    assert separated([0.3, 0.1, 0.5], [0.0, 0.2, 0.2])[0] is False
    assert separated([0.3, 0.4], [0.0, 0.1, 0.2]) == (True, pytest.approx(1 / 10))


def test_separation_is_claimed_only_at_chance_at_most_0_05_and_else_the_seeds_it_takes():
    assert ALPHA == 0.05
    # 3 against 3, all above: chance 1/C(6, 3) = 0.05
    assert verdict([0.5, 0.6, 0.7], [0.1, 0.2, 0.3], "B") == \
        "seeds separate it from B (chance 0.05)"
    # all above, but 2 against 3 can never reach 0.05 (1/C(5, 2) = 0.1), nor 1 against 1
    # (1/C(2, 1) = 0.5): the counts, not the rewards, decide
    assert verdict([0.5, 0.6], [0.1, 0.2, 0.3], "B") == (
        "its seeds all lie above those of B, but with 2 and 3 seeds the test cannot tell: that "
        "ordering has chance 0.1 when the two do not differ, and reaching 0.05 takes 3 seeds "
        "each")
    assert verdict([0.9], [0.1], "B").endswith("chance 0.5 when the two do not differ, and "
                                               "reaching 0.05 takes 3 seeds each")
    assert verdict([0.1], [0.9], "B").startswith("seeds do not separate it from B, but with 1 "
                                                 "seed each the test cannot tell")
    # enough seeds, overlapping rewards: not separated, and no more seeds asked for
    assert verdict([0.5, 0.1, 0.6], [0.2, 0.3, 0.4], "B") == "seeds do not separate it from B"


@pytest.mark.parametrize(("ran", "needed"), [((1, 1), (3, 3)), ((2, 3), (3, 3)), ((3, 3), (3, 3)),
                                             ((5, 1), (5, 2)), ((4, 4), (4, 4))])
def test_the_seeds_it_takes_are_the_fewest_at_which_the_ordering_test_reaches_0_05(ran, needed):
    assert seeds_to_separate(*ran) == needed
    a, b = needed
    assert 1 / math.comb(a + b, a) <= ALPHA
    # one seed fewer in all, split any way that keeps the seeds that ran, cannot reach it
    assert all(1 / math.comb(a + b - 1, k) > ALPHA for k in range(ran[0], a + b - ran[1])) \
        or a + b - 1 < sum(ran)


def table_row(lines, group):
    """(mean, std) of each cell of ``group``'s row that has one."""
    row = next(line for line in lines if line.startswith(f"| {group} |"))
    return [(float(c.split("±")[0]), float(c.split("±")[1].split()[0]))
            for c in row.strip("|").split("|")[2:] if "±" in c]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Three seeds each of a fast drift (fixed: KL 0.002 a step, reward = 0.5 + 2·KL +
    0.01·seed) and a slow one (adaptive: 0.001 a step, reward = 0.5 + KL + 0.02·seed). Both
    are lines in the step, so their 10-step trailing means keep those relations exactly."""
    root = tmp_path_factory.mktemp("drift") / "sweep"
    steps = range(STEPS)
    for seed in range(3):
        write_run(root / f"fixed{seed}", schedule="fixed", seed=seed,
                  kl=[0.002 * i for i in steps], beta=[0.05] * STEPS,
                  reward=[0.5 + 0.004 * i + 0.01 * seed for i in steps])
        write_run(root / f"adaptive{seed}", schedule="adaptive", seed=seed,
                  kl=[0.001 * i for i in steps], beta=[0.05] * STEPS,
                  reward=[0.5 + 0.001 * i + 0.02 * seed for i in steps])
    assert main([str(root)]) == 0
    return root


def test_the_table_shows_each_schedule_at_the_budget_and_up_to_the_smallest_final_kl(report):
    lines = (report / "equal_drift.md").read_text().splitlines()
    # adaptive's final KL, the last-quarter mean of 0.001·i over steps 37–49, is 0.043: the
    # grid is 0.043·(1..4)/4, and the budget is the runs' target 0.05
    header = next(line for line in lines if line.startswith("| group |"))
    assert [float(c.split()[0]) for c in header.strip("|").split("|")[2:]] == pytest.approx(
        [0.043 / 4, 0.043 / 2, 0.043 * 3 / 4, 0.043, 0.05], abs=5e-4)  # as shown, 3 digits
    assert header.endswith("| 0.05 (budget) |")
    # fixed at k: 0.5 + 2k + 0.01·seed → mean 0.51 + 2k, std 0.01; adaptive 0.52 + k, std
    # 0.02, and it never reaches 0.05 (its smoothed KL ends at 0.001·44.5)
    levels = [0.043 / 4, 0.043 / 2, 0.043 * 3 / 4, 0.043]
    np.testing.assert_allclose(table_row(lines, "fixed"),
                               [(0.51 + 2 * k, 0.01) for k in [*levels, 0.05]], atol=6e-4)
    np.testing.assert_allclose(table_row(lines, "adaptive"),
                               [(0.52 + k, 0.02) for k in levels], atol=6e-4)
    assert next(line for line in lines if line.startswith("| adaptive |")).endswith("| — |")
    # at 0.043 fixed's seeds (0.586, 0.596, 0.606) are all above adaptive's (0.543, 0.563,
    # 0.583); at 0.0107 they interleave
    assert "* KL 0.043: fixed leads; seeds separate it from adaptive (chance 0.05)" in lines
    assert "* KL 0.0108: fixed leads; seeds do not separate it from adaptive" in lines
    assert "* KL 0.05: fewer than two schedules reached it" in lines
    assert "## Reward at equal drift" in (report / "report.md").read_text()


def test_the_figure_is_drawn_and_shown_in_the_report(report):
    assert matplotlib.image.imread(report / "equal_drift.png").shape[0] > 100
    assert "![Reward against KL at equal drift](equal_drift.png)" in (
        report / "report.md").read_text()
    assert TARGET == 0.05
