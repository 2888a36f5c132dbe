"""``rollout.lag`` = K: the rollout of step t is the one sampled with the weights of step
max(0, t − K), in an engine process of its own, with draws seeded by the run's seed and t
alone; so a run is deterministic, a killed one resumes to the numbers of the run left alone,
an engine that dies ends the run in one line with its checkpoint intact, and no process is
left behind. (The vLLM engine behind the lag: tests/test_vllm_engine.py.)"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from klsweep.config import compose_and_validate
from klsweep.engines import build_engine
from klsweep.engines.lagged import EngineDied
from klsweep.engines.worker import sample_seed
from klsweep.models.tiny import TinyConfig, TinyGPT
from klsweep.rollout import Prompts, generate
from tests.conftest import assert_refused_in_one_line, run_and_read
from tests.test_resume import assert_same_run, rows_written, run_here, start, wait_for
from tests.test_sweeper_loop import (  # noqa: F401  (config_loader is a fixture)
    SINGLE_OBJECTIVE,
    ScriptedLauncher,
    config_loader,
    raises,
    study,
    sweep,
)

SEED, N, NEW_TOKENS, EOS = 7, 2, 4, 5


def policy_at(step: int) -> TinyGPT:
    """The policy's weights of step ``step``: the same initial model, moved by the step."""
    torch.manual_seed(0)
    model = TinyGPT(TinyConfig("tiny", 1, 2, 16, 0.0), vocab_size=6, block_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * step * torch.sin(torch.arange(p.numel()).reshape(p.shape) + step))
    return model


def prompts_of(step: int) -> Prompts:
    return Prompts.unpadded(torch.tensor([[step % 5, 1], [2, (step + 3) % 5]]))


def lagged_engine(lag: int):
    rollout = SimpleNamespace(engine="native", lag=lag, temperature=1.0, threads=1)
    return build_engine(rollout, None, policy_at(0), max_new_tokens=NEW_TOKENS, eos_id=EOS,
                        seed=SEED)


def expected(step: int, lag: int):
    """What the engine must hand out at ``step``: the policy of step max(0, step − lag)
    sampling the step's prompts, with the draws seeded by the run's seed and the step."""
    policy = policy_at(max(0, step - lag)).eval()
    torch.manual_seed(sample_seed(SEED, step))
    return generate(policy, prompts_of(step), n_per_prompt=N, max_new_tokens=NEW_TOKENS,
                    eos_id=EOS)


def train_steps(engine, steps: range) -> list:
    """What the trainer's calls do each step: push the step's weights, take its rollout."""
    rollouts = []
    for step in steps:
        engine.load_weights(policy_at(step))
        rollouts.append((engine.sample(prompts_of(step), N), engine.metrics()))
    return rollouts


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine process's: the same float sums, the same draws
    yield
    torch.set_num_threads(threads)


def test_the_rollout_of_step_t_is_sampled_with_the_weights_of_step_t_minus_the_lag(one_thread):
    engine = lagged_engine(lag=2)
    engine.look_ahead(prompts_of(step) for step in range(8))
    try:
        taken = train_steps(engine, range(6))
        for step, (rollout, metrics) in enumerate(taken):
            want = expected(step, lag=2)
            assert rollout.version == max(0, step - 2)
            assert metrics["rollout/lag"] == min(step, 2)
            assert torch.equal(rollout.tokens, want.tokens), step
            assert torch.allclose(rollout.engine_logp, want.old_logp, atol=1e-5)
            assert {"perf/trainer_busy_s", "perf/trainer_idle_s", "perf/engine_busy_s",
                    "perf/engine_idle_s"} <= set(metrics)

        # a checkpoint holds the rollouts sampled for the next two steps; an engine resumed
        # from it (a fresh process) hands out the same rollouts as the one left alone
        state = engine.state_dict()
        assert sorted(state["rollouts"]) == ["6", "7"] and state["step"] == 6
        resumed = lagged_engine(lag=2)
        resumed.load_state_dict(copy.deepcopy(state))
        resumed.look_ahead(prompts_of(step) for step in range(6, 10))
        engine.look_ahead(prompts_of(step) for step in range(8, 10))
        for (alone, _), (again, _) in zip(train_steps(engine, range(6, 10)),
                                          train_steps(resumed, range(6, 10)), strict=True):
            assert torch.equal(alone.tokens, again.tokens)
            assert alone.version == again.version
        resumed.close()
        assert not resumed.process.is_alive()
    finally:
        engine.close()
    assert not engine.process.is_alive()


def test_an_engine_process_that_dies_ends_the_wait_with_its_cause():
    engine = lagged_engine(lag=1)
    engine.look_ahead(prompts_of(step) for step in range(4))
    try:
        train_steps(engine, range(1))
        os.kill(engine.process.pid, signal.SIGKILL)
        engine.process.join(10)
        with pytest.raises(EngineDied, match=rf"the rollout engine's process \(pid "
                                             rf"{engine.process.pid}\) died \(killed by "
                                             rf"SIGKILL\) before the rollout of step \d"):
            train_steps(engine, range(1, 3))
    finally:
        engine.close()


def test_auto_at_a_lag_corrects_the_kl_by_the_sequence_s_ratio_and_the_gradient_by_tis():
    cfg = compose_and_validate({"rollout.lag": "2", "task": "exact"})
    assert cfg.kl.is_correction == "sequence"  # what --help, the record and W&B show
    assert (cfg.rollout.correction, cfg.rollout.tis_cap) == ("token_truncate", 2.0)
    synchronous = compose_and_validate({"task": "exact"})
    assert synchronous.kl.is_correction is True and synchronous.rollout.correction == "none"


@pytest.mark.parametrize("overrides, message", [
    (["rollout.lag=-1"], "rollout.lag must be an integer >= 0 (got -1)"),
    (["rollout.lag=1", "trainer=ddp"],
     "rollout.lag=1 runs one engine process beside one training process (trainer.strategy "
     "auto; got ddp): an engine per rank, each sent its rank's weights and prompts, is not "
     "built"),
    (["rollout.lag=1", "trainer=fsdp"], "(trainer.strategy auto; got fsdp): an engine per rank"),
    (["rollout.correction=sequence_clip"],
     "rollout.correction must be one of auto, none, token_truncate, token_mask, "
     "sequence_truncate, sequence_mask, decoupled (got 'sequence_clip')"),
    (["rollout.tis_cap=-2"], "rollout.tis_cap must be a number > 0 (got -2)"),
    (["rollout.correction=decoupled"],
     "rollout.correction=decoupled clips against the policy one step behind"),
    (["rollout.lag=1", "algo=dpo"],
     "rollout.lag=1 samples a rollout a step ahead of the trainer, which algo=grpo and "
     "algo=ppo take (got algo=dpo)"),
    (["rollout.lag=1", "rollout.sync_every=2"], "rollout.sync_every must be 1 with rollout.lag=1"),
    # what the audit's table says follows no target off-policy
    (["rollout.lag=2", "kl.is_correction=true"],
     "kl.estimator=k3 kl.is_correction=true in the loss follows no KL's gradient off-policy "
     "(rollout.lag=2: the audit's table, klsweep.kl.forms); type kl.is_correction=sequence, "
     "or auto for the audit's choice"),
    (["rollout.lag=1", "estimator=k2"],
     "kl.estimator=k2 kl.is_correction=false in the loss follows no KL's gradient off-policy "
     "(rollout.lag=1: the audit's table, klsweep.kl.forms); at rollout.lag > 0 type "
     "kl.estimator=k1 | k3 | full (auto corrects it by the sequence's ratio), or "
     "kl.placement=none"),
    (["rollout.lag=1", "algo=ppo"],
     "kl.estimator=k1 in the reward follows no KL's gradient off-policy (rollout.lag=1: the "
     "audit's table, klsweep.kl.forms); at rollout.lag > 0 type kl.placement=loss with "
     "kl.estimator=k1 | k3 | full"),
    (["rollout.lag=1", "kl.divergence=chi2", "estimator=k1"],
     "kl.divergence=chi2 at rollout.lag=1: the audit's table holds only the reverse KL's "
     "forms off-policy"),
    (["kl.is_correction=sequence", "estimator=k2"],
     "kl.estimator=k2 kl.is_correction=sequence in the loss follows no KL's gradient "
     "(without the correction it follows reverse_kl_myopic"),
])
def test_bad_lag_input_fails_in_one_line_before_anything_is_written(
        overrides, message, tmp_path, monkeypatch, capsys):
    assert_refused_in_one_line(overrides, message, tmp_path / "run", monkeypatch, capsys)


# --- the real command ---------------------------------------------------------------------
LAGGED = ["steps=12", "checkpoint.every=3", "algo.prompts_per_step=2", "algo.group_size=4",
          "rollout.lag=2"]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process ``pid`` started, and theirs (multiprocessing's resource tracker too)."""
    found = children(pid)
    return found + [d for c in found for d in descendants(c)]


def engine_pids(pid: int) -> list[int]:
    """The engine processes that ``pid`` started (spawned: their command line runs
    multiprocessing's spawn_main)."""
    def cmdline(c: int) -> str:
        try:
            return Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""
    return [c for c in children(pid) if "spawn_main" in cmdline(c)]


def gone(pid: int, timeout: float = 30) -> bool:
    """Whether ``pid`` ends (or has ended) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # ended; its parent has not reaped it yet
            return True
        time.sleep(0.05)
    return False


def running_engine(process) -> tuple[int, list[int]]:
    """The run's engine process, once it runs, and every process the run has started then."""
    found: list[int] = []
    wait_for(process, lambda: bool(found.extend(engine_pids(process.pid)) or found))
    return found[0], descendants(process.pid)


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory) -> Path:
    """The lagged run, the real command left alone; every process it started ends with it."""
    run_dir = tmp_path_factory.mktemp("lag-alone")
    process = start(run_dir, LAGGED)
    _, started = running_engine(process)
    assert process.wait(timeout=300) == 0
    assert all(gone(pid) for pid in started)
    return run_dir


@pytest.mark.slow
def test_a_lagged_run_logs_its_lag_and_both_sides_timing_and_leaves_no_process(left_alone):
    rows = [json.loads(line) for line in (left_alone / "metrics.jsonl").read_text().splitlines()]
    assert [row["rollout/lag"] for row in rows] == [0, 1] + [2] * 10
    for key in ("perf/trainer_busy_s", "perf/trainer_idle_s", "perf/engine_busy_s",
                "perf/engine_idle_s", "rollout/is_mean", "rollout/is_cut",
                "rollout/mismatch_k3"):
        assert all(key in row for row in rows), key
    assert rows[0]["rollout/mismatch_max"] < 1e-5  # the first rollouts: the trainer's weights
    assert rows[-1]["rollout/mismatch_max"] > 1e-3  # the later: two steps behind it


@pytest.mark.slow
def test_at_lag_1_the_rollout_of_each_step_is_sampled_with_the_weights_of_the_step_before(
        tmp_path):
    # AReaL's decoupled correction weighs each token by π_prox/π_behaviour, π_prox the
    # trainer's copy of the policy one step behind: 1 to float rounding on every token if,
    # and only if, the engine process sampled with exactly those weights
    _, rows = run_and_read(tmp_path, *LAGGED, "rollout.lag=1", "rollout.correction=decoupled",
                           "steps=5")
    assert [row["rollout/lag"] for row in rows] == [0, 1, 1, 1, 1]
    for row in rows:
        assert row["rollout/is_max"] < 1 + 1e-5 and row["rollout/is_cut"] == 0
        assert row["rollout/is_mean"] == pytest.approx(1.0, abs=1e-5)
    assert rows[-1]["rollout/mismatch_max"] > 1e-3  # while the policy moved a step each time


@pytest.mark.slow
def test_a_lagged_run_killed_with_sigkill_resumes_to_the_numbers_of_the_run_left_alone(
        left_alone, tmp_path):
    process = start(tmp_path, LAGGED)
    _, started = running_engine(process)
    wait_for(process, lambda: rows_written(tmp_path) >= 7)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert all(gone(pid) for pid in started)  # the engine dies with its trainer
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(saved["klsweep"]["pair"]["engine"]["rollouts"]) == [
        str(saved["global_step"]), str(saved["global_step"] + 1)]
    summary = run_here(tmp_path, LAGGED)
    assert summary["resumed_from_step"] == saved["global_step"] > 0
    assert_same_run(tmp_path, left_alone)


@pytest.mark.slow
def test_an_engine_that_dies_ends_the_run_in_one_line_and_its_checkpoint_resumes(
        left_alone, tmp_path):
    process = start(tmp_path, LAGGED, stdout=subprocess.PIPE)
    engine, started = running_engine(process)
    wait_for(process, lambda: (tmp_path / "checkpoints" / "last.ckpt").exists())
    os.kill(engine, signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in err
    last = out.strip().splitlines()[-1]  # the run's summary line, with its reason
    assert last.startswith("klsweep: ") and " failed after " in last
    assert f"the rollout engine's process (pid {engine}) died (killed by SIGKILL)" in last
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "died (killed by SIGKILL)" in summary["reason"]
    assert all(gone(pid) for pid in started)
    # the last checkpoint is intact: the same command resumes it to the numbers left alone
    assert run_here(tmp_path, LAGGED)["status"] == "completed"
    assert_same_run(tmp_path, left_alone)


@pytest.mark.slow
def test_sigterm_stops_a_lagged_run_with_a_checkpoint_and_leaves_no_process_behind(
        left_alone, tmp_path):
    process = start(tmp_path, LAGGED)
    _, started = running_engine(process)
    wait_for(process, lambda: rows_written(tmp_path) >= 5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert all(gone(pid) for pid in started)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "interrupted"
    assert run_here(tmp_path, LAGGED)["status"] == "completed"
    assert_same_run(tmp_path, left_alone)


def test_a_sweep_trial_whose_engine_died_is_failed_with_the_cause(
        config_loader, tmp_path):  # noqa: F811
    died = EngineDied("the rollout engine's process (pid 1) died (killed by SIGKILL) before "
                      "the rollout of step 3; the last checkpoint is intact: the same command "
                      "resumes the run")
    sweep(config_loader, tmp_path, ScriptedLauncher({0: raises(died)}, tmp_path),
          *SINGLE_OBJECTIVE, "hydra.sweeper.n_trials=1", "hydra.sweeper.max_failures=2")
    trials = study(tmp_path).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["reason"] == str(died)
    assert trials[0].user_attrs["status"] == "failed"
