"""Sweeps on a study in PostgreSQL: two workers sharing it, as on several machines, and a
password in the storage URL that no file and no log line of the sweep holds.

Needs a server: KLSWEEP_TEST_POSTGRES_URL (``.ci/run`` starts a throwaway one on 127.0.0.1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from hydra_plugins.klsweep_optuna._search_space import override_string

POSTGRES_URL = os.environ.get("KLSWEEP_TEST_POSTGRES_URL")
REPO = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.enable_progress_bar=false", "algo.prompts_per_step=2",
        "algo.group_size=4"]

pytestmark = [
    pytest.mark.postgres, pytest.mark.slow,
    pytest.mark.skipif(not POSTGRES_URL, reason="KLSWEEP_TEST_POSTGRES_URL is not set: no "
                       "PostgreSQL server to share a study (.ci/run starts one)"),
]


def test_two_workers_sharing_a_postgres_study_end_with_exactly_n_trials(tmp_path):
    study_name = f"two-workers-{uuid.uuid4().hex[:8]}"
    n_trials = 4
    args = ["sweep=beta_target", "steps=2", *FAST, f"hydra.sweeper.n_trials={n_trials}",
            override_string("hydra.sweeper.storage", POSTGRES_URL),
            f"hydra.sweeper.study_name={study_name}"]
    workers = [subprocess.Popen([sys.executable, "-m", "klsweep", "-m", *args,
                                 f"hydra.sweep.dir={tmp_path / f'worker{i}'}"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
               for i in range(2)]
    outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    try:
        assert [w.returncode for w in workers] == [0, 0], "\n".join(outputs)
        trials = optuna.load_study(study_name=study_name, storage=POSTGRES_URL).trials
        by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
        assert len(by_state[TrialState.COMPLETE]) == n_trials
        assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
        # a trial asked by both workers at once past n_trials is closed, never left open
        assert all(t.user_attrs["reason"].startswith("surplus")
                   for t in by_state[TrialState.FAIL])
        assert len({t.number for t in trials}) == len(trials)
        for trial in by_state[TrialState.COMPLETE]:  # each result came from its own run
            assert (Path(trial.user_attrs["run_dir"]) / "summary.json").exists()
        ran = {Path(t.user_attrs["run_dir"]).parent.name for t in by_state[TrialState.COMPLETE]}
        assert ran <= {"worker0", "worker1"}
    finally:
        optuna.delete_study(study_name=study_name, storage=POSTGRES_URL)


# The test server trusts every connection from 127.0.0.1, so any password is accepted
PASSWORD = "fake-Pa55word-of-the-test"


@pytest.mark.parametrize("storage", ["env:KLSWEEP_TEST_STORAGE",
                                     "${oc.env:KLSWEEP_TEST_STORAGE}"])
def test_a_password_in_the_storage_url_is_in_no_file_and_no_log_line(tmp_path, storage):
    study_name = f"private-{uuid.uuid4().hex[:8]}"
    url = make_url(POSTGRES_URL).set(password=PASSWORD).render_as_string(hide_password=False)
    result = subprocess.run(
        [sys.executable, "-m", "klsweep", "-m", "sweep=beta_target", "task=exact", "steps=2",
         *FAST, "logger=wandb", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
         f"hydra.sweeper.study_name={study_name}", "hydra.sweeper.report_every=1",
         "hydra.sweeper.objectives={kl/final:null}",  # one objective: trials report values
         f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "KLSWEEP_TEST_STORAGE": url, "WANDB_MODE": "offline"})
    try:
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        trials = optuna.load_study(study_name=study_name, storage=url).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
        assert all(t.intermediate_values for t in trials)  # each run reached the study itself
        assert PASSWORD not in output
        assert f"{make_url(url).username}:***@" in output  # the URL is shown, masked
        written = [path for path in tmp_path.rglob("*") if path.is_file()]
        assert {"multirun.yaml", "best.yaml", "overrides.yaml", "hydra.yaml",
                "config.yaml"} <= {path.name for path in written}
        assert any(path.suffix == ".wandb" for path in written)
        assert [path for path in written if PASSWORD.encode() in path.read_bytes()] == []
    finally:
        optuna.delete_study(study_name=study_name, storage=url)
