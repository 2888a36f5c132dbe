"""Two sweep workers sharing one Optuna study in PostgreSQL, as on several machines.

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

from hydra_plugins.klsweep_optuna._search_space import override_string

POSTGRES_URL = os.environ.get("KLSWEEP_TEST_POSTGRES_URL")
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.postgres, pytest.mark.slow,
    pytest.mark.skipif(not POSTGRES_URL, reason="KLSWEEP_TEST_POSTGRES_URL is not set: no "
                       "PostgreSQL server to share a study (.ci/run starts one)"),
]


def test_two_workers_sharing_a_postgres_study_end_with_exactly_n_trials(tmp_path):
    study_name = f"two-workers-{uuid.uuid4().hex[:8]}"
    n_trials = 4
    args = ["sweep=beta_target", "steps=2", "logger=none", "trainer.enable_progress_bar=false",
            "algo.prompts_per_step=2", "algo.group_size=4", f"hydra.sweeper.n_trials={n_trials}",
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
