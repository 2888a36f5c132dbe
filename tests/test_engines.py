"""The rollout-engine seam: the mismatch metrics and truncated importance weights as pure
functions, and bad ``rollout.*`` input refused before training in one line. The vLLM engine
itself is tested in tests/test_vllm_engine.py (``pytest -m vllm``)."""

import importlib.util
import math

import pytest
import torch

from klsweep.engines import mismatch_metrics, tis_weights
from tests.conftest import assert_refused_in_one_line


def test_mismatch_k3_is_an_unbiased_estimate_of_kl_from_engine_to_trainer():
    # two distributions over 4 tokens; 200,000 tokens drawn from the engine's: the sample
    # mean of k3 is within 5 standard errors of KL(engine || trainer)
    engine = torch.tensor([0.1, 0.2, 0.3, 0.4])
    train = torch.tensor([0.25, 0.25, 0.25, 0.25])
    tokens = torch.multinomial(engine, 200_000, replacement=True,
                               generator=torch.Generator().manual_seed(0))[None]
    engine_logp, train_logp = engine.log()[tokens], train.log()[tokens]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    metrics = mismatch_metrics(train_logp, engine_logp, mask)
    exact = float((engine * (engine / train).log()).sum())
    l = engine_logp - train_logp
    stderr = float((torch.expm1(-l) + l).std()) / math.sqrt(tokens.numel())
    assert abs(metrics["rollout/mismatch_k3"] - exact) < 5 * stderr
    assert metrics["rollout/mismatch_max"] == pytest.approx(float((engine / train).log()
                                                                  .abs().max()))


def test_the_mismatch_ignores_tokens_outside_the_completions():
    train = torch.tensor([[-1.0, -2.0, -3.0]])
    engine = torch.tensor([[-1.0, -2.5, 9.0]])  # the last token is past EOS
    mask = torch.tensor([[True, True, False]])
    metrics = mismatch_metrics(train, engine, mask)
    assert metrics["rollout/mismatch_max"] == pytest.approx(0.5)
    assert metrics["rollout/mismatch_k3"] == pytest.approx((math.exp(0.5) - 1 - 0.5) / 2)


def test_tis_weights_are_the_ratio_truncated_at_the_cap_and_carry_no_gradient():
    train = torch.tensor([0.0, -1.0, -3.0], requires_grad=True)
    engine = torch.tensor([0.0, -2.0, -1.0])
    weights = tis_weights(train, engine, cap=2.0)
    assert not weights.requires_grad
    assert torch.allclose(weights, torch.tensor([1.0, 2.0, math.exp(-2.0)]))


VLLM_MISSING = importlib.util.find_spec("vllm") is None


@pytest.mark.parametrize("overrides,message", [
    (["rollout.engine=foo"], "rollout.engine must be one of native, vllm (got 'foo')"),
    (["rollout.engine=vllm"], "rollout.engine=vllm needs model=hf, a transformers model vLLM "
                              "can load (got model=tiny)"),
    (["rollout.engine=vllm", "model=hf"],
     "rollout.engine=vllm needs model.name, a checkpoint vLLM loads"),
    (["rollout.engine=vllm", "model=hf", "task=text", "task.prompts=prompts.jsonl",
      "model.name=some/model", "trainer=ddp"],
     "rollout.engine=vllm runs one engine in one training process (trainer.strategy auto; "
     "got ddp): an engine per rank is not built"),
    (["rollout.tis_cap=0"], "rollout.tis_cap must be a number > 0 (got 0)"),
    (["rollout.sync_every=0"], "rollout.sync_every must be an integer >= 1 (got 0)"),
    pytest.param(["rollout.engine=vllm", "model=hf", "task=text", "task.prompts=prompts.jsonl",
                  "model.name=some/model"],
                 "rollout.engine=vllm needs vLLM, which is not installed",
                 marks=pytest.mark.skipif(not VLLM_MISSING, reason="vLLM is installed here")),
])
def test_bad_rollout_input_fails_in_one_line_before_anything_is_written(
        overrides, message, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "The movie was"}\n')
    monkeypatch.chdir(tmp_path)
    assert_refused_in_one_line(overrides, message, run_dir, monkeypatch, capsys)


def test_a_lora_policy_sends_vllm_its_base_weights_with_the_adapter_merged_under_hf_names(
        tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from klsweep.engines.vllm import hf_weights
    from tests.hf_fixtures import save_tiny_model

    base = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, "llama"))
    names = set(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero: move it so that the merge changes W
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sent = dict(hf_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(sent) == names == set(merged)
    for name, tensor in sent.items():
        assert torch.allclose(tensor, merged[name], atol=1e-6), name
    assert not torch.equal(sent["model.layers.0.self_attn.q_proj.weight"],
                           base.get_submodule("model.layers.0.self_attn.q_proj")
                           .base_layer.weight)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
