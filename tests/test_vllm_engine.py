"""rollout.engine=vllm on a tiny Llama saved on disk (no download), in the environment that
scripts/vllm_cpu_env.sh builds (``pytest -m vllm``; skipped where vLLM is not installed).

float32 on CPU: the engine's and the trainer's kernels differ only in rounding, so their
log-probs of one token agree to ~1e-5 (measured: a few 1e-6 over a vocabulary of 320); a
policy moved by optimiser steps, if its new weights were not pushed, disagrees by ~1e-1."""

import math
import signal

import pytest
import torch

pytest.importorskip("vllm")

from klsweep.config import compose_and_validate  # noqa: E402
from klsweep.train import build_module  # noqa: E402
from tests.conftest import run_and_read, run_klsweep  # noqa: E402
from tests.hf_fixtures import build_tokenizer, write_prompt_file  # noqa: E402
from tests.test_resume import assert_same_run, rows_written, start, wait_for  # noqa: E402

pytestmark = [pytest.mark.vllm]

FLOAT32_NOISE = 1e-4   # |Δ log p| of one token, rounding alone (see the module's docstring)
PROMPTS = ["The movie was", "I think this food is", "My day was", "The weather today is"]
# a small KV cache: the CPU build reserves 4 GiB by default
VLLM_RUN = ["model=hf", "task=text", "task.reward=length", "task.max_new_tokens=8",
            "rollout.engine=vllm", "rollout.kv_cache_gib=0.25", "algo.prompts_per_step=2",
            "algo.group_size=4", "optim.lr=1e-2", "trainer.enable_progress_bar=false"]


def save_llama(directory, arch="LlamaForCausalLM"):
    """A 2-layer Llama with heads 32 wide (the CPU build's attention kernels start at 32)
    and the tokenizer of tests/hf_fixtures.py, saved as a hub checkpoint would be."""
    from transformers import AutoModelForCausalLM, GPTNeoConfig, LlamaConfig

    tokenizer = build_tokenizer(directory)
    ids = dict(vocab_size=-(-len(tokenizer) // 64) * 64, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if arch == "GPTNeoForCausalLM":  # an architecture vLLM lacks
        config = GPTNeoConfig(hidden_size=64, num_layers=2, num_heads=2,
                              attention_types=[[["global"], 2]], max_position_embeddings=128,
                              **ids)
    else:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=128, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompt_file(tmp_path_factory.mktemp("data"), PROMPTS)


@pytest.fixture(scope="module")
def module(llama, prompt_file):
    overrides = dict(o.split("=", 1) for o in VLLM_RUN)
    overrides.update({"model.name": str(llama), "task.prompts": str(prompt_file),
                      "logger": "none"})
    return build_module(compose_and_validate(overrides))


def mismatch(module, n_prompts=4, n_per_prompt=4):
    """Max |Δ log p| between the engine's and the trainer's log-probs of fresh samples."""
    prompts = module.task.sample_prompts(n_prompts, torch.Generator().manual_seed(1))
    scored = module.pair.score(module.pair.sample(prompts, n_per_prompt), grad=False)
    rollout = scored.rollout
    assert int(rollout.mask.sum()) > n_prompts * n_per_prompt  # more than one token a row
    return float(((scored.logp - rollout.engine_logp) * rollout.mask).abs().max())


def test_the_engine_s_log_probs_of_its_samples_are_the_trainer_s_at_the_initial_weights(module):
    assert mismatch(module) < FLOAT32_NOISE


def test_after_optimizer_steps_the_pushed_weights_keep_the_engine_on_the_policy(module):
    pair = module.pair
    optimizer = torch.optim.SGD(pair.policy.parameters(), lr=0.5)
    prompts = module.task.sample_prompts(4, torch.Generator().manual_seed(2))
    for _ in range(3):  # push up the log-probs of some samples: the policy moves
        scored = pair.score(pair.sample(prompts, 4))
        optimizer.zero_grad()
        (-(scored.logp * scored.mask).sum() / scored.mask.sum()).backward()
        optimizer.step()
    # the engine still holds the weights pushed before the last step: a skipped sync shows
    stale = pair.engine.sample(prompts, 4)
    stale_logp = pair.score(stale, grad=False).logp
    assert float(((stale_logp - stale.engine_logp) * stale.mask).abs().max()) > 100 * FLOAT32_NOISE
    assert mismatch(module) < FLOAT32_NOISE  # sample() pushes the new weights first


def test_a_grpo_run_through_vllm_records_the_mismatch_every_step(llama, prompt_file, tmp_path):
    summary, rows = run_and_read(tmp_path, *VLLM_RUN, f"model.name={llama}",
                                 f"task.prompts={prompt_file}", "steps=3", "rollout.tis_cap=2")
    assert summary["status"] == "completed" and len(rows) == 3
    for row in rows:
        assert 0 <= row["rollout/mismatch_k3"] < FLOAT32_NOISE**2
        assert 0 <= row["rollout/mismatch_max"] < FLOAT32_NOISE
    assert math.isfinite(summary["reward/final"])


def test_a_lora_run_through_vllm_keeps_the_engine_on_the_moving_policy(llama, prompt_file,
                                                                         tmp_path):
    """The engine receives the base weights with the adapter merged after every step: the
    adapter moves the policy away from the reference (its B starts at zero, so the first
    step's KL is 0), and the engine's samples stay on the policy to float32 noise."""
    summary, rows = run_and_read(tmp_path, *VLLM_RUN, f"model.name={llama}",
                                 f"task.prompts={prompt_file}", "steps=4",
                                 "model.lora={r: 8, alpha: 16, dropout: 0.0, "
                                 "target_modules: all-linear}")
    assert summary["status"] == "completed" and len(rows) == 4
    assert rows[0]["kl/k1"] == 0 and rows[-1]["kl/k2"] > 100 * FLOAT32_NOISE**2
    for row in rows:
        assert 0 <= row["rollout/mismatch_max"] < FLOAT32_NOISE


# at a lag the checkpoint also holds the rollouts the engine sampled ahead
@pytest.mark.parametrize("lag", [0, 1])
def test_a_vllm_run_killed_halfway_resumes_to_the_numbers_of_the_run_left_alone(
        lag, llama, prompt_file, tmp_path):
    run = [*VLLM_RUN, f"model.name={llama}", f"task.prompts={prompt_file}", "steps=6",
           "checkpoint.every=2", "logger=none", f"rollout.lag={lag}"]
    run_and_read(tmp_path / "alone", *run)
    run_dir = tmp_path / "killed"
    process = start(run_dir, run)
    wait_for(process, lambda: rows_written(run_dir) >= 3, timeout=300)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < saved["global_step"] < 6 and not (run_dir / "summary.json").exists()
    if lag:
        assert list(saved["klsweep"]["pair"]["engine"]["rollouts"]) == [
            str(saved["global_step"])]
    summary, _ = run_and_read(run_dir, *run)
    assert summary["resumed_from_step"] == saved["global_step"]
    assert_same_run(run_dir, tmp_path / "alone")


@pytest.mark.parametrize("arch", ["GPTNeoForCausalLM"])
def test_an_architecture_vllm_lacks_fails_before_training_in_one_line(arch, prompt_file,
                                                                      tmp_path):
    model_dir = save_llama(tmp_path / "model", arch)
    result = run_klsweep(*VLLM_RUN, f"model.name={model_dir}", f"task.prompts={prompt_file}",
                         "model.attn_implementation=eager",  # GPT-Neo has no sdpa
                         "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("klsweep: error: rollout.engine=vllm: vLLM") and arch in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
