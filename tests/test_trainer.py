"""The trainer group's arguments: FSDP shards each decoder layer of the policy."""

import pytest

from klsweep.config import ConfigError, choice_config, compose_and_validate
from klsweep.models.tiny import Block, TinyGPT
from klsweep.trainer import FullyShardedStrategy, decoder_layer_classes, trainer_arguments
from tests.hf_fixtures import save_tiny_model


def _tiny() -> TinyGPT:
    return TinyGPT(choice_config("model", "tiny", n_layer=2, n_head=2, n_embd=16), 8, 8)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp_shards_and_optionally_checkpoints_each_decoder_layer(checkpointing):
    cfg = compose_and_validate({"trainer": "fsdp",
                                "trainer.activation_checkpointing": str(checkpointing).lower()})
    args = trainer_arguments(cfg.trainer, _tiny())
    strategy = args["strategy"]
    assert isinstance(strategy, FullyShardedStrategy) and "activation_checkpointing" not in args
    assert strategy.layer_classes == {Block}
    assert strategy.activation_checkpointing == checkpointing


def test_decoder_layers_are_found_in_transformers_models_by_their_own_declaration(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, "llama"))
    assert {c.__name__ for c in decoder_layer_classes(model)} == {"LlamaDecoderLayer"}
    assert decoder_layer_classes(_tiny()) == {Block}


def test_other_strategies_pass_through_as_lightning_s_strings():
    cfg = compose_and_validate({"trainer": "cpu"})
    assert trainer_arguments(cfg.trainer, _tiny())["strategy"] == "auto"


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_fsdp_runs_on_the_cpu(accelerator):
    cfg = compose_and_validate({"trainer": "fsdp", "trainer.accelerator": accelerator,
                                "trainer.precision": "32-true"})
    assert cfg.trainer.strategy == "fsdp"


def test_fsdp_with_a_precision_lightning_s_strategy_lacks_fails_in_one_line_before_training():
    with pytest.raises(ConfigError, match=r"^trainer.strategy=fsdp takes trainer.precision "
                                          r"32-true, 32, bf16-mixed, bf16-true \(got 16-mixed\)$"):
        compose_and_validate({"trainer": "fsdp", "trainer.precision": "16-mixed"})
