"""A moving reference (TR-DPO; TRL's sync_ref_model): the soft update's formula, and the two
KLs a run then logs."""

import copy

import pytest
import torch

from klsweep.config import choice_config, compose_and_validate
from klsweep.models.tiny import TinyGPT
from klsweep.policy import KLConfig, PolicyPair
from klsweep.schema import ConfigError, from_node
from tests.conftest import run_and_read


def _pair(sync_every: int, mix: float) -> PolicyPair:
    cfg = compose_and_validate({"kl.reference.sync_every": str(sync_every),
                                "kl.reference.mix": str(mix)})
    torch.manual_seed(0)
    reference = TinyGPT(choice_config("model", "tiny", n_layer=1, n_head=2, n_embd=16),
                        vocab_size=7, block_size=8)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    return PolicyPair(policy, reference, from_node(KLConfig, cfg.kl), temperature=1.0,
                      max_new_tokens=4, eos_id=6)


def test_a_reference_of_another_shape_cannot_move_and_says_so_before_training():
    cfg = compose_and_validate({"kl.reference.sync_every": "4"})
    policy = TinyGPT(choice_config("model", "tiny", n_layer=1, n_head=2, n_embd=16),
                     vocab_size=7, block_size=8)
    reference = TinyGPT(choice_config("model", "tiny", n_layer=1, n_head=2, n_embd=32),
                        vocab_size=7, block_size=8)
    with pytest.raises(ConfigError, match=r"^kl.reference.sync_every mixes the policy into "
                                          r"the reference parameter by parameter, but the "
                                          r"reference's parameters are not the policy's"):
        PolicyPair(policy, reference, from_node(KLConfig, cfg.kl), temperature=1.0,
                   max_new_tokens=4, eos_id=6)


@pytest.mark.parametrize("mix", [0.6, 1.0])
def test_sync_is_the_soft_update_of_each_parameter(mix):
    pair = _pair(sync_every=3, mix=mix)
    before = {n: p.clone() for n, p in pair.reference.named_parameters()}
    policy = dict(pair.policy.named_parameters())
    pair.sync_reference()
    for name, param in pair.reference.named_parameters():
        torch.testing.assert_close(param, (1 - mix) * before[name] + mix * policy[name])
    # the initial model stays where the reference started
    for name, param in pair.initial.named_parameters():
        torch.testing.assert_close(param, before[name])


def test_syncs_fall_after_every_sync_every_updates_and_never_when_frozen():
    assert [s for s in range(10) if _pair(4, 0.6).due_for_sync(s)] == [3, 7]
    frozen = _pair(0, 0.6)
    assert frozen.initial is None and not any(frozen.due_for_sync(s) for s in range(10))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_a_moving_reference_logs_the_kl_to_it_and_to_the_initial_model(algo, tmp_path):
    _, rows = run_and_read(tmp_path, f"algo={algo}", "steps=6", "schedule=fixed",
                           "kl.beta=0.1", "kl.reference.sync_every=2", "kl.reference.mix=1.0",
                           "algo.prompts_per_step=4" if algo == "grpo" else "algo.eval_every=1",
                           *(["algo.dataset_pairs=64", "algo.pairs_per_step=16"]
                             if algo == "dpo" else []))
    # before the first sync the reference is the initial model
    assert rows[0]["kl/to_init"] == pytest.approx(rows[0]["kl/mean"], abs=1e-6)
    # after a hard copy at step 1 the penalised KL restarts from zero, the drift does not
    assert rows[2]["kl/to_init"] != pytest.approx(rows[2]["kl/mean"], abs=1e-6)
    assert rows[-1]["kl/to_init"] > 0


def test_the_frozen_default_logs_kl_to_init_equal_to_kl_mean(tmp_path):
    _, rows = run_and_read(tmp_path, "steps=2", "algo.prompts_per_step=2", "algo.group_size=2")
    assert all(row["kl/to_init"] == row["kl/mean"] for row in rows)


@pytest.mark.slow
def test_the_exact_task_logs_the_exact_kl_to_the_initial_model_beside_the_kl_to_the_reference(
        tmp_path):
    _, rows = run_and_read(tmp_path, "task=exact", "steps=4", "task.eval_every=1",
                           "algo.prompts_per_step=4", "kl.reference.sync_every=2",
                           "kl.reference.mix=1.0")
    exact = [row for row in rows if "exact/kl" in row]
    assert exact[0]["exact/kl_to_init"] == pytest.approx(exact[0]["exact/kl"], rel=1e-9)
    # after the hard copy at step 1 the reference is the policy of step 1, not the initial one
    assert exact[2]["exact/kl_to_init"] > exact[2]["exact/kl"]
