"""The report against run dirs built by hand: runs.csv and report.md values are checked
against numbers computed here from the metrics files and the trajectories' design."""

import csv
import json
import math
import re

import matplotlib.image
import numpy as np
import pytest
import yaml

from klsweep.report import main
from klsweep.report.figures import exact_frontier, pareto_front
from klsweep.report.markdown import best_tracker_sentence
from klsweep.report.runs import Group

TARGET = 0.05
STEPS = 50


def write_run(path, *, schedule, seed, kl, beta, reward, status="completed", task="digits",
              config=None, exact=None, wall_time_s=10.0, swept=None):
    """A run dir as train() leaves it: .hydra/config.yaml (unresolved, as Hydra saves it),
    metrics.jsonl and summary.json."""
    (path / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "name": None, "steps": STEPS,
           "kl": {"beta": beta[0], "target": TARGET, "placement": "${algo.kl_placement}",
                  "estimator": "${algo.kl_estimator}", "unit": "token",
                  "schedule": {"name": schedule}},
           "algo": {"name": "grpo", "kl_placement": "loss", "kl_estimator": "k3"},
           "task": {"name": task, "completion_len": 2}}
    for dotted, value in (config or {}).items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with (path / "metrics.jsonl").open("w") as f:
        for step, (k, b, r) in enumerate(zip(kl, beta, reward, strict=True)):
            row = {"step": step, "kl/mean": k, "kl/seq": 10 * k, "kl/beta": b,
                   "kl/target": TARGET, "reward/mean": r}
            if exact and step % 10 == 9:
                row.update({"exact/kl": 2 * k, "exact/reward": r, "exact/frontier_gap": 0.01})
            f.write(json.dumps(row) + "\n")
    summary = {"status": status, "name": f"grpo-k3-{schedule}-s{seed}", "algo": "grpo",
               "estimator": "k3", "schedule": schedule, "placement": "loss", "task": task,
               "seed": seed, "wall_time_s": wall_time_s, "swept": swept or {}}
    (path / "summary.json").write_text(json.dumps(summary))
    if exact:
        (path / "exact.json").write_text(json.dumps(exact))


def adaptive_kl(settle_at):
    """Twice the target, then on it: settles (10-step trailing mean within ±20%) at
    settle_at + 7, when only two steps of the excess are left in the window."""
    return [2 * TARGET] * settle_at + [TARGET] * (STEPS - settle_at)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Five hand-made runs, reported once for the tests that read the report."""
    root = tmp_path_factory.mktemp("report") / "sweep"
    rising = [0.01 * i for i in range(STEPS)]  # fixed β: KL climbs to 0.49, never settles
    for seed, settle_at in ((0, 20), (1, 30)):
        write_run(root / f"{seed}", schedule="adaptive", seed=seed, kl=adaptive_kl(settle_at),
                  beta=[0.05 * (1 + 0.01 * i) for i in range(STEPS)],
                  reward=[0.5 + 0.002 * i + 0.01 * seed for i in range(STEPS)],
                  wall_time_s=10.0 + seed)
        write_run(root / f"{2 + seed}", schedule="fixed", seed=seed, kl=rising,
                  beta=[0.05] * STEPS, reward=[0.6 + 0.004 * i for i in range(STEPS)],
                  wall_time_s=20.0 + seed)
    # a run that diverged after 12 steps: reported with its status, not on the Pareto front
    write_run(root / "4", schedule="pid", seed=0, kl=[0.3] * 12, beta=[0.05] * 12,
              reward=[0.9] * 12, status="diverged")
    assert main([str(root)]) == 0
    return root


def read_csv(path):
    with open(path) as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def last_quarter_mean(path, key):
    values = [json.loads(line)[key] for line in open(path) if line.strip()]
    tail = values[-math.ceil(len(values) / 4):]
    return sum(tail) / len(tail)


def test_runs_csv_matches_the_metrics_files_and_the_designed_trajectories(sweep):
    rows = read_csv(sweep / "runs.csv")
    assert set(rows) == {"grpo-k3-adaptive-s0", "grpo-k3-adaptive-s1", "grpo-k3-fixed-s0",
                         "grpo-k3-fixed-s1", "grpo-k3-pid-s0"}
    for row in rows.values():
        metrics = sweep / row["path"].split("/")[-1] / "metrics.jsonl"
        assert float(row["reward_final"]) == pytest.approx(last_quarter_mean(metrics,
                                                                             "reward/mean"))
        assert float(row["kl_final"]) == pytest.approx(last_quarter_mean(metrics, "kl/mean"))
        assert float(row["kl_seq_final"]) == pytest.approx(10 * float(row["kl_final"]))
        last = [json.loads(line) for line in open(metrics)][-1]
        assert float(row["beta_final"]) == pytest.approx(last["kl/beta"])
    adaptive0, adaptive1 = rows["grpo-k3-adaptive-s0"], rows["grpo-k3-adaptive-s1"]
    assert float(adaptive0["steps_to_target"]) == 27
    assert float(adaptive1["steps_to_target"]) == 37
    assert float(adaptive0["overshoot"]) == pytest.approx(2.0)
    assert float(adaptive0["tracking_error"]) == 0.0  # second half (25..49) on target
    assert float(adaptive1["tracking_error"]) == pytest.approx(5 / 25)  # 25..29 at +100%
    fixed = rows["grpo-k3-fixed-s0"]
    assert math.isnan(float(fixed["steps_to_target"] or "nan"))
    # smoothed peak: mean of 0.40..0.49 = 0.445
    assert float(fixed["overshoot"]) == pytest.approx(0.445 / TARGET)
    # second half 0.25..0.49: mean |x − 0.05| / 0.05 = (0.37 − 0.05) / 0.05
    assert float(fixed["tracking_error"]) == pytest.approx(6.4)
    assert float(fixed["beta_volatility"]) == 0.0
    assert rows["grpo-k3-pid-s0"]["status"] == "diverged"
    assert rows["grpo-k3-pid-s0"]["steps_done"] == "12"
    assert float(adaptive1["wall_time_s"]) == 11.0
    assert adaptive0["group"] == "adaptive" and fixed["group"] == "fixed"


def test_report_md_ranks_schedules_by_tracking_error_with_mean_and_std(sweep):
    text = (sweep / "report.md").read_text()
    # steps to target 27 and 37: mean 32, sample std 7.07; error 0 and 0.2: 0.1 ± 0.14
    assert "| adaptive | 2 | 32 ± 7.1 | 2 ± 0 | 0.1 ± 0.14 | 0 ± 0 |" in text
    assert "| fixed | 2 | never | 8.9 ± 0 | 6.4 ± 0 | 0 ± 0 |" in text
    assert "**adaptive** tracked the target best: tracking error 0.1 ± 0.14" in text
    # the diverged pid ranks last though its error before it stopped (5) is below fixed's
    assert "runner-up **fixed** (64.0× as much); the gap is more than two standard errors" in text
    assert "| pid | 1 (1 diverged) | never | 6 | 5 |" in text
    table = text[text.index("| group |"):text.index("### ")]
    assert table.index("| adaptive |") < table.index("| fixed |") < table.index("| pid |")
    assert "1 diverged" in text and "4 completed" in text
    assert ("They varied **schedule** (adaptive, fixed, pid): 3 groups, 1–2 seeds each. All had "
            "algorithm grpo, task digits, estimator k3.") in text
    for name in ("kl_trajectories.png", "beta_trajectories.png", "reward_vs_kl.png",
                 "tracking.png"):
        assert f"]({name})" in text
        height, width, _ = matplotlib.image.imread(sweep / name).shape
        assert width >= 600 and height >= 250


def test_globs_and_out_dir_and_groups_that_differ_by_more_than_the_schedule(tmp_path):
    for i, beta in enumerate((0.1, 0.2)):
        for seed in (0, 1):
            write_run(tmp_path / "runs" / f"b{i}s{seed}", schedule="fixed", seed=seed,
                      kl=[TARGET] * STEPS, beta=[beta] * STEPS, reward=[0.5] * STEPS,
                      config={"kl.beta": beta})
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs" / "b*"), "--out", str(out)]) == 0
    with open(out / "runs.csv") as f:
        groups = [row["group"] for row in csv.DictReader(f)]
    assert sorted(groups) == ["fixed · kl.beta=0.1"] * 2 + ["fixed · kl.beta=0.2"] * 2
    assert main([str(tmp_path / "nothing-here")]) == 2


def test_exact_task_runs_report_exact_kl_per_token(tmp_path):
    exact = {"prompts": [{"ref_logp": [math.log(0.75), math.log(0.25)], "reward": [0.0, 1.0],
                          "policy_logp": [math.log(0.5), math.log(0.5)]}]}
    for seed in (0, 1):
        write_run(tmp_path / f"{seed}", schedule="adaptive", seed=seed, task="exact",
                  kl=[TARGET] * STEPS, beta=[0.1] * STEPS, reward=[0.5] * STEPS, exact=exact)
    assert main([str(tmp_path)]) == 0
    row = read_csv(tmp_path / "runs.csv")["grpo-k3-adaptive-s0"]
    # the last exact/kl (per sequence) is 2·0.05, over completions of 2 tokens
    assert float(row["exact_kl"]) == pytest.approx(TARGET)
    assert float(row["exact_reward"]) == 0.5
    text = (tmp_path / "report.md").read_text()
    assert "| exact KL (nats/token) | exact reward | gap to frontier |" in text
    assert "| 0.05 ± 0 | 0.5 ± 0 | 0.01 ± 0 |" in text
    assert (tmp_path / "reward_vs_kl.png").is_file()


def test_exact_frontier_runs_from_the_reference_to_the_best_completion():
    # π_ref = (3/4, 1/4), r = (0, 1): at β = ∞ the reference (KL 0, reward 1/4); at β → 0
    # all mass on the rewarded completion (KL log 4 per sequence, reward 1)
    exact = {"prompts": [{"ref_logp": [math.log(0.75), math.log(0.25)], "reward": [0.0, 1.0]}]}
    kl, reward = exact_frontier(exact, completion_len=2)
    assert kl[0] == pytest.approx(0.0) and reward[0] == pytest.approx(0.25)
    assert kl[-1] == pytest.approx(math.log(4) / 2) and reward[-1] == pytest.approx(1.0)
    assert all(b >= a - 1e-12 for a, b in zip(kl, kl[1:], strict=False))
    assert all(b >= a - 1e-12 for a, b in zip(reward, reward[1:], strict=False))
    # inside: π ∝ π_ref·exp(r/β) at 1/β = log 3 is (1/2, 1/2), reward 1/2 and KL
    # ½·log(⅔) + ½·log 2 = ½·log(4/3) per sequence; the grid steps 1/β by 12%, so linear
    # interpolation between grid points is within 1%
    assert np.interp(0.5, reward, kl) == pytest.approx(0.5 * math.log(4 / 3) / 2, rel=0.01)


def test_pareto_front_keeps_points_no_other_beats_on_both():
    kl = [0.1, 0.2, 0.3, 0.15, 0.5]
    reward = [0.5, 0.7, 0.6, 0.4, 0.9]
    front_kl, front_reward = pareto_front(kl, reward)
    assert list(front_kl) == [0.1, 0.2, 0.5]
    assert list(front_reward) == [0.5, 0.7, 0.9]


def test_best_tracker_says_when_seeds_do_not_separate_the_two_best():
    def group(label, mean, std, n):
        return Group(panel="grpo · digits", label=label, schedule=label, runs=[],
                     stats={"tracking_error": (mean, std, n)})

    # gap 0.03; standard error of the difference sqrt(0.07²/2 + 0.03²/2) = 0.054
    close = best_tracker_sentence([group("pid", 0.17, 0.07, 2), group("adaptive", 0.2, 0.03, 2)])
    assert "within two standard errors (0.11), so more seeds are needed" in close
    apart = best_tracker_sentence([group("pid", 0.17, 0.01, 3), group("adaptive", 0.5, 0.02, 3)])
    assert "the gap is more than two standard errors" in apart
    alone = best_tracker_sentence([group("pid", 0.17, 0.0, 1), group("adaptive", 0.5, 0.0, 1)])
    assert "standard error" not in alone and "over 1 seed," in alone


def test_a_study_over_a_continuous_beta_reports_one_group_per_point(tmp_path):
    # an Optuna study: every trial its own β, so every run its own group (more groups than
    # the figures' legends name one by one)
    betas = [0.01 * (i + 1) for i in range(18)]
    for i, beta in enumerate(betas):
        write_run(tmp_path / str(i), schedule="adaptive" if i % 2 else "fixed", seed=0,
                  kl=[TARGET] * STEPS, beta=[beta] * STEPS, reward=[beta] * STEPS,
                  config={"kl.beta": beta})
    assert main([str(tmp_path)]) == 0
    with open(tmp_path / "runs.csv") as f:
        assert len({row["group"] for row in csv.DictReader(f)}) == 18


def test_exact_json_holds_best_of_n_and_the_reward_kl_figure_draws_it_beside_the_frontier(
        tmp_path):
    from types import SimpleNamespace

    import torch

    from klsweep.config import choice_config
    from klsweep.exact_math import best_of_n_kl_bound
    from klsweep.kl.divergences import make_divergence
    from klsweep.models.tiny import TinyGPT
    from klsweep.report.figures import _one_reward, exact_best_of_n
    from klsweep.tasks.exact import ExactTask

    task = ExactTask(choice_config("task", "exact", vocab_size=3, completion_len=2,
                                   n_prompts=2))
    torch.manual_seed(0)
    model = TinyGPT(choice_config("model", "tiny", n_layer=1, n_head=2, n_embd=16),
                    task.vocab_size, task.prompt_len + task.max_new_tokens).eval()
    pair = SimpleNamespace(policy=model, reference=model, initial=None, temperature=1.0,
                           divergence=make_divergence("reverse_kl"),
                           kl=SimpleNamespace(unit="token"))
    task.evaluate(pair, step=0, beta_seq=0.1)
    task.finalize(pair, tmp_path)
    exact = json.loads((tmp_path / "exact.json").read_text())
    bon = exact["best_of_n"]
    assert exact["reward_source"] == "gold" and "gold_reward" not in bon
    assert bon["n"] == [1, 2, 4, 8, 16, 32, 64]
    assert bon["kl"][0] == pytest.approx(0.0, abs=1e-12)  # n = 1 is π_ref
    assert bon["reward"][0] == pytest.approx(exact["metrics"]["exact/reward"])
    assert all(kl <= bound + 1e-12 for kl, bound in zip(bon["kl"], bon["kl_bound"], strict=True))
    assert bon["kl_bound"] == [best_of_n_kl_bound(n) for n in bon["n"]]
    assert all(b >= a for a, b in zip(bon["reward"], bon["reward"][1:], strict=False))
    # the figure's curve, recomputed from the tables alone, is the table, per token
    other = json.loads(json.dumps(exact))
    other["prompts"][0]["reward"][0] += 1.0  # another proxy's table: no shared frontier
    assert _one_reward([exact, exact]) and not _one_reward([exact, other])
    ns, kl, reward = exact_best_of_n(exact, completion_len=2)
    np.testing.assert_allclose(kl, np.asarray(bon["kl"]) / 2, atol=1e-12)
    np.testing.assert_allclose(reward, bon["reward"], atol=1e-12)
    for seed in (0, 1):
        write_run(tmp_path / "sweep" / f"{seed}", schedule="fixed", seed=seed, task="exact",
                  kl=[TARGET] * STEPS, beta=[0.1] * STEPS, reward=[0.5] * STEPS, exact=exact)
    assert main([str(tmp_path / "sweep")]) == 0
    assert (tmp_path / "sweep" / "reward_vs_kl.png").is_file()


def test_runs_sampled_by_another_engine_report_its_mismatch_beside_the_kl(tmp_path):
    for seed in (0, 1):
        run = tmp_path / f"{seed}"
        write_run(run, schedule="adaptive", seed=seed, kl=[TARGET] * STEPS,
                  beta=[0.1] * STEPS, reward=[0.5] * STEPS)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for step, row in enumerate(rows):  # the mismatch of a vLLM run's steps
            row.update({"rollout/mismatch_k3": 1e-6 * (1 + step % 2),
                        "rollout/mismatch_max": 1e-3 * (seed + 1) if step == 3 else 1e-4})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(tmp_path)]) == 0
    row = read_csv(tmp_path / "runs.csv")["grpo-k3-adaptive-s1"]
    assert float(row["mismatch_k3"]) == pytest.approx(1.5e-6)  # the mean over steps
    assert float(row["mismatch_max"]) == pytest.approx(2e-3)   # the largest step's
    text = (tmp_path / "report.md").read_text()
    assert "| engine mismatch k3 (mean) | engine max abs Δlog p |" in text
    assert "| 1.5e-06 ± 0 | 0.0015 ± 0.00071 |" in text


def test_a_sweep_without_a_target_is_reported_by_what_it_varied_and_ranks_no_tracking(tmp_path):
    # as sweep=divergences: β fixed, two divergences × two β, one seed each; kl.target keeps
    # its default, which no fixed-β run reads
    for i, (divergence, beta) in enumerate([("reverse_kl", 0.1), ("reverse_kl", 0.2),
                                            ("forward_kl", 0.1), ("forward_kl", 0.2)]):
        write_run(tmp_path / str(i), schedule="fixed", seed=0,
                  kl=[0.002 * (i + 1) * step for step in range(STEPS)], beta=[beta] * STEPS,
                  reward=[0.5 + 0.01 * i * step for step in range(STEPS)],
                  config={"kl.beta": beta, "kl.divergence": divergence},
                  swept={"kl.divergence": divergence, "kl.beta": beta})
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    lead = text.split("\n\n")[1]  # the paragraph under the title
    assert lead == (f"4 runs from {tmp_path} (4 completed). They varied **kl.divergence** "
                    "(forward_kl, reverse_kl) and **kl.beta** (0.1, 0.2): 4 groups, 1 seed "
                    "each (seed 0). All had algorithm grpo, task digits, schedule fixed, "
                    "estimator k3.")
    assert "tracked the target" not in text and "Target KL" not in text
    assert "No schedule here steers β toward a target KL (fixed)" in text
    table = text[text.index("| group |"):]
    assert table.startswith("| group | seeds | β volatility | final reward |")
    assert not (tmp_path / "tracking.png").exists() and "tracking.png" not in text
    # the groups in the order of their values, not by an error against an unused target
    labels = [line.split(" | ")[0][2:] for line in table.splitlines()[2:6]]
    assert labels == ["fixed · kl.beta=0.1 · kl.divergence=forward_kl",
                      "fixed · kl.beta=0.1 · kl.divergence=reverse_kl",
                      "fixed · kl.beta=0.2 · kl.divergence=forward_kl",
                      "fixed · kl.beta=0.2 · kl.divergence=reverse_kl"]
    # one seed a group: no level's leader is said to be separated, and no budget level
    bullets = [line for line in text.splitlines() if re.match(r"\* KL [0-9.]+: ", line)]
    assert bullets and all("seeds separate" not in b and b.endswith("takes 3 seeds each")
                           for b in bullets)
    assert "(budget)" not in text
