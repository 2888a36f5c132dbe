"""optim.lr: null is the model's own default: 3e-4 for a model trained from scratch by the
task, TRL's 1e-6 for full fine-tuning of a pretrained checkpoint, ten times that with LoRA."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from klsweep.config import CONF_DIR
from klsweep.train import optim_settings

PRETRAINED = ["model=hf", "model.name=some/checkpoint"]


@pytest.mark.parametrize(("overrides", "lr"), [
    ([], 3e-4),                                          # model=tiny
    (["model=hf"], 3e-4),                                # a random arch, trained from scratch
    (PRETRAINED, 1e-6),                                  # TRL's GRPO and DPO default
    ([*PRETRAINED, "model.lora={r: 8}"], 1e-5),          # LoRA: ten times full fine-tuning's
    ([*PRETRAINED, "optim.lr=2e-5"], 2e-5),              # a rate set on the command line stays
])
def test_a_null_learning_rate_is_the_models_default(overrides, lr):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert optim_settings(cfg).lr == pytest.approx(lr)
