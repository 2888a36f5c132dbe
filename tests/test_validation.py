"""Validation reads each node's typed dataclass once, top to bottom: a field declared with
``spec(...)`` is checked wherever its dataclass sits, a field typed by another dataclass is a
node checked against it, and a schedule's options come from the schedule's own signature."""

from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from klsweep.config import compose_and_validate
from klsweep.schema import ConfigError, check_nodes, spec


@pytest.mark.parametrize("overrides,message", [
    ({"kl.reference.mix": "2"}, "kl.reference.mix must be a number > 0 and <= 1 (got 2)"),
    ({"+kl.reference.every": "1"},
     "kl.reference.every is not a known key (allowed under kl.reference: sync_every, mix)"),
    ({"schedule": "adaptive", "+kl.schedule.horizonn": "3"},
     "kl.schedule.horizonn is not a known key (allowed under kl.schedule: name, clip, horizon)"),
    ({"schedule": "adaptive", "kl.schedule.horizon": "abc"},
     "kl.schedule.horizon must be a number (got 'abc')"),
])
def test_nested_nodes_and_schedule_options_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        compose_and_validate(overrides)
    assert str(info.value) == message


@dataclass
class _Inner:
    cap: float = spec(kind="number", gt=1, help="a cap")


@dataclass
class _Outer:
    engine: str = spec(kind="choice", choices=("native", "vllm"), help="an engine")
    inner: _Inner = spec(kind="node", help="a nested node")

    @staticmethod
    def check_run(cfg):
        if cfg.part.engine == "vllm" and cfg.part.inner.cap > 5:
            raise ConfigError(f"part.inner.cap must be <= 5 with vllm (got {cfg.part.inner.cap})")


@pytest.mark.parametrize("node,message", [
    ({"engine": "jax", "inner": {"cap": 2.0}}, "part.engine must be one of native, vllm"),
    ({"engine": "native", "inner": {"cap": 1.0}}, "part.inner.cap must be a number > 1 (got 1.0)"),
    ({"engine": "vllm", "inner": {"cap": 9.0}}, "part.inner.cap must be <= 5 with vllm"),
])
def test_a_field_declared_with_spec_is_checked_with_no_other_registration(node, message):
    cfg = OmegaConf.create({"part": node})
    with pytest.raises(ConfigError) as info:
        check_nodes(cfg, [("part", _Outer)])
    assert str(info.value).startswith(message)
    check_nodes(OmegaConf.create({"part": {"engine": "native", "inner": {"cap": 9.0}}}),
                [("part", _Outer)])
