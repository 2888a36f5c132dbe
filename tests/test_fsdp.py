"""``trainer=fsdp`` on two CPU ranks (gloo): FSDP2 shards the policy, the frozen reference and
PPO's value head. FSDP is data parallelism, so a run's numbers are a DDP run's: the same
gradients, averaged by a reduce-scatter instead of an all-reduce. A run killed with SIGKILL
resumes from its checkpoint (the full weights and AdamW state gathered to rank 0, scattered
back into shards) to the numbers of the run left alone."""

from __future__ import annotations

import copy
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from klsweep.config import choice_config
from klsweep.models.tiny import Block, untrained_tiny
from klsweep.records import read_metrics
from klsweep.rollout import Prompts, generate
from klsweep.sharding import gathered, shard_model, unsharded_trainable
from tests.conftest import REPO, TINY, run_and_read, run_klsweep
from tests.test_resume import assert_same_run, rows_written, wait_for

TWO_CPU_RANKS = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
FSDP = ["trainer=fsdp", *TWO_CPU_RANKS]
# GRPO, checkpointed every 2 of 8 steps: a kill halfway leaves a checkpoint before the end
RUN = [*TINY, "steps=8", "logger=none"]
# PPO trains a value head beside the policy; a moving reference is mixed with the policy
# shard by shard
PPO = ["algo=ppo", "steps=3", "algo.prompts_per_step=2", "algo.samples_per_prompt=2",
       "algo.ppo_epochs=2", "kl.reference.sync_every=1", "kl.reference.mix=0.5",
       "trainer.enable_progress_bar=false", "logger=none"]


@pytest.fixture
def mesh():
    """A gloo process group of one rank in this process: FSDP2 shards over it as over many
    (each shard is then the whole tensor), enough to see what the plan makes of a model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


# a view among a unit's outputs is FSDP2's warning (trainer.py says why klsweep ignores it)
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_the_plan_makes_each_block_a_unit_inside_the_root_and_serves_every_entry_point(mesh):
    policy, reference = untrained_tiny(choice_config("model", "tiny", n_layer=2, n_head=2,
                                                     n_embd=16), 8, 12)
    plain = copy.deepcopy(policy)
    shard_model(policy, mesh, {Block})
    shard_model(reference, mesh, {Block})
    for model in (policy, reference):
        assert [m for m in model.modules() if isinstance(m, FSDPModule)] == [model,
                                                                             *model.blocks]
        assert all(isinstance(p, DTensor) for p in model.parameters())
    assert policy.lm_head.weight is policy.wte.weight  # the tied head: one parameter, in the root
    assert unsharded_trainable([policy]) == []
    assert unsharded_trainable([nn.Linear(2, 1)]) == ["weight", "bias"]

    tokens = torch.randint(0, 8, (4, 10))
    # the interface's passes that do not go through forward gather the root's weights too
    for got, want in zip(policy.completion_logits_and_hidden(tokens, None, 4, 2),
                         plain.completion_logits_and_hidden(tokens, None, 4, 2), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(policy.completion_logits(tokens, None, 4, group_size=2),
                               plain.completion_logits(tokens, None, 4, group_size=2),
                               rtol=0, atol=0)
    # sampling runs on weights gathered once, and leaves them sharded
    prompts = Prompts.unpadded(tokens[:2, :4])
    samples = []
    for model in (policy, plain):
        torch.manual_seed(0)
        with gathered(model):
            samples.append(generate(model, prompts, n_per_prompt=2, max_new_tokens=6, eos_id=0))
    assert torch.equal(samples[0].tokens, samples[1].tokens)
    assert all(isinstance(p, DTensor) for p in policy.parameters())


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory) -> Path:
    """The GRPO run on two FSDP ranks, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("fsdp-alone")
    result = run_klsweep(*RUN, *FSDP, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_an_fsdp_run_writes_the_numbers_of_a_ddp_run_with_a_value_head_and_moving_reference(
        tmp_path):
    runs = {}
    for strategy in ("fsdp", "ddp"):
        runs[strategy] = tmp_path / strategy
        summary, _ = run_and_read(runs[strategy], *PPO, f"trainer={strategy}", *TWO_CPU_RANKS)
        assert summary["status"] == "completed" and summary["steps_done"] == 3
    # float32 noise only (ε = 1.2e-7): the gradients are summed in another order, so weights
    # differ by a few ulps a step; a gradient reduced wrongly moves them by its own size
    rows, ddp_rows = (read_metrics(runs[s] / "metrics.jsonl") for s in ("fsdp", "ddp"))
    assert [row.keys() for row in rows] == [row.keys() for row in ddp_rows]
    for row, expected in zip(rows, ddp_rows, strict=True):
        for key, value in expected.items():
            if not key.startswith("perf/"):
                assert math.isclose(row[key], value, rel_tol=1e-5, abs_tol=1e-7), (
                    f"step {row['step']}: {key} = {row[key]!r}, under DDP {value!r}")
    sharded, replicated = trained_weights(runs["fsdp"]), trained_weights(runs["ddp"])
    # the full state of every trained tensor, the value head's and the moved reference's too
    assert sharded.keys() == replicated.keys()
    assert any(key.startswith("reference.") for key in sharded)
    # AdamW's steps are about lr (3e-4) in size whatever the gradient's: a parameter whose
    # gradient is zero but for float noise (the key bias, which softmax ignores) steps where
    # the noise points, so weights agree to a few lr; shards gathered out of place would
    # differ by the weights' own size (0.02 and up)
    for key, value in replicated.items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-3, msg=key)
    assert all(row["dist/world_size"] == 2 and row["dist/beta_spread"] == 0 for row in rows)


@pytest.mark.slow
def test_an_fsdp_run_killed_halfway_resumes_to_the_numbers_of_the_run_left_alone(
        left_alone, tmp_path):
    run_dir = tmp_path / "run"
    args = [*RUN, *FSDP, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    # its own session: SIGKILL reaches both ranks at once, as when their node dies
    process = subprocess.Popen([sys.executable, "-m", "klsweep", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        wait_for(process, lambda: rows_written(run_dir) >= 4)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < saved["global_step"] < 8 and not (run_dir / "summary.json").exists()
    # AdamW's moments, full and keyed by parameter name, for every trained tensor
    moments = saved["optimizer_states"][0]["state"]
    assert set(moments) == set(saved["state_dict"])
    summary, _ = run_and_read(run_dir, *RUN, *FSDP)
    assert summary["resumed_from_step"] == saved["global_step"]
    assert_same_run(run_dir, left_alone)
