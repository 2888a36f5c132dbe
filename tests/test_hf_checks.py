"""model=hf: the one-line errors before training, for a bad model node and for a checkpoint
that cannot be built as the run asks."""

from __future__ import annotations

import pytest
from hf_fixtures import save_tiny_model
from omegaconf import OmegaConf
from test_hf_model import StandInTask, build, counting_recipe, hf_node

from klsweep.models.hf_build import HFModelConfig, build_hf, check_model
from klsweep.schema import ConfigError


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("hf") / "gpt2", "gpt2", seed=1))


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize("keys, accelerator, parts", [
    ({"name": "/no/such/model"}, "cpu",
     ["model.name='/no/such/model'", "no such directory", "hub id"]),
    ({"name": "./models/mine"}, "cpu", ["model.name='./models/mine'", "directory"]),
    ({"name": "not a hub id!"}, "cpu", ["model.name='not a hub id!'", "hub id"]),
    ({"arch": "mamba"}, "cpu", ["model.arch", "gpt2, llama, qwen2", "'mamba'"]),
    ({"dtype": "float16"}, "cpu", ["model.dtype=float16", "float32, bfloat16"]),
    ({"attn_implementation": "flash_attention_2"}, "cpu",
     ["model.attn_implementation=flash_attention_2", "sdpa, eager"]),
    ({"n_embd": 30}, "cpu", ["model.n_embd", "model.n_head", "30"]),
    ({"reference_name": "gpt2"}, "cpu", ["model.reference_name='gpt2'",
                                               "model.name"]),
    ({"lora": {"r": 8, "dropout": 0.1}}, "cpu", ["model.lora.dropout", "disable_dropout", "0.1"]),
    ({"lora": {"rank": 8}}, "cpu", ["model.lora.rank", "r, alpha, dropout, target_modules"]),
    ({"lora": {"target_modules": 3}}, "cpu", ["model.lora.target_modules", "3"]),
])
def test_check_model_names_the_key_the_value_and_what_is_allowed(keys, accelerator, parts):
    with pytest.raises(ConfigError) as err:
        check_model(hf_node(**keys), accelerator)
    assert_one_line(err, *parts)


def test_check_model_accepts_a_local_checkpoint_and_gpu_only_settings_on_gpu(gpt2):
    check_model(hf_node(name=gpt2, lora={"r": 4}), "cpu")
    check_model(hf_node(dtype="float16", attn_implementation="flash_attention_2"), "gpu")


def test_a_directory_without_config_and_an_uncached_hub_id_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(ConfigError) as err:
        check_model(hf_node(name=str(tmp_path)), "cpu")
    assert_one_line(err, str(tmp_path), "config.json")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        check_model(hf_node(name="someone/uncached-model"), "cpu")
    assert_one_line(err, "model.name='someone/uncached-model'", "HF_HUB_OFFLINE")


def test_the_run_check_reads_the_trainer_accelerator():
    cfg = OmegaConf.create({"model": hf_node(dtype="float16"),
                            "trainer": {"accelerator": "cpu"}, "task": {"name": "digits"},
                            "kl": {"reference": {"sync_every": 0}}})
    with pytest.raises(ConfigError, match="model.dtype=float16"):
        HFModelConfig.check_run(cfg)
    cfg.model.dtype = "float32"
    HFModelConfig.check_run(cfg)


def test_build_errors_are_one_line(gpt2, tmp_path):
    with pytest.raises(ConfigError) as err:
        build(gpt2, lora={"target_modules": ["q_proj"]})
    assert_one_line(err, "model.lora.target_modules has q_proj", "c_attn")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        build(str(broken))
    assert_one_line(err, f"model.name={str(broken)!r} could not be loaded")
    with pytest.raises(ConfigError) as err:
        build(gpt2, StandInTask(name="digits", recipe=counting_recipe("x")))
    assert_one_line(err, "task=digits", "model.name=null")
    with pytest.raises(ConfigError) as err:
        build_hf(hf_node(), StandInTask())
    assert_one_line(err, "task=text has none", "model.name")
