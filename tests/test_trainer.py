"""The trainer group's arguments: FSDP wraps each decoder layer of the policy."""

import pytest
from lightning.pytorch.strategies import FSDPStrategy

from klsweep.config import ConfigError, choice_config, compose_and_validate
from klsweep.models.tiny import Block, TinyGPT
from klsweep.trainer import decoder_layer_classes, trainer_arguments
from tests.hf_fixtures import save_tiny_model


def _tiny() -> TinyGPT:
    return TinyGPT(choice_config("model", "tiny", n_layer=2, n_head=2, n_embd=16), 8, 8)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp_wraps_and_optionally_checkpoints_each_decoder_layer(checkpointing):
    cfg = compose_and_validate({"trainer": "fsdp",
                                "trainer.activation_checkpointing": str(checkpointing).lower()})
    args = trainer_arguments(cfg.trainer, _tiny())
    strategy = args["strategy"]
    assert isinstance(strategy, FSDPStrategy) and "activation_checkpointing" not in args
    assert strategy.kwargs["auto_wrap_policy"] is not None
    assert (strategy._activation_checkpointing_kwargs != {}) == checkpointing


def test_decoder_layers_are_found_in_transformers_models_by_their_own_declaration(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, "llama"))
    assert {c.__name__ for c in decoder_layer_classes(model)} == {"LlamaDecoderLayer"}
    assert decoder_layer_classes(_tiny()) == {Block}


def test_other_strategies_pass_through_as_lightning_s_strings():
    cfg = compose_and_validate({"trainer": "cpu"})
    assert trainer_arguments(cfg.trainer, _tiny())["strategy"] == "auto"


def test_fsdp_on_the_cpu_fails_in_one_line_before_training():
    """Lightning's FSDPStrategy takes CUDA only; klsweep says so before the Trainer does."""
    with pytest.raises(ConfigError, match=r"^trainer.strategy=fsdp needs CUDA GPUs .*"
                                          r"trainer.accelerator=cpu\); use trainer=ddp on CPU$"):
        compose_and_validate({"trainer": "fsdp", "trainer.accelerator": "cpu"})
