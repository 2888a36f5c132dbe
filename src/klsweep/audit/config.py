"""The ``audit`` node (one typed definition) and the composed config of an audit: the run's
config (conf/config.yaml, the same groups) plus ``audit.*``, checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from klsweep.config import CONF_DIR, check_overrides, validate
from klsweep.kl.forms import TARGETS
from klsweep.schema import ConfigError, check_node, check_value, spec

METHODS = ("auto", "monte_carlo")
# algo name -> its key for optimizer steps on one batch (audit.staleness)
INNER_UPDATES = {"grpo": "updates_per_rollout", "ppo": "ppo_epochs"}


@dataclass(frozen=True)
class AuditConfig:
    """``audit``: where the policy is audited and how many draws measure it."""

    train_steps: int = spec(kind="integer", ge=0, help="updates of the run's algorithm first")
    staleness: int = spec(kind="integer", ge=0,
                          help="optimizer steps on one batch before the audit (π ≠ π_old)")
    samples: int = spec(kind="integer", ge=1, help="N draws (variance; Monte Carlo off exact)")
    groups: int = spec(kind="integer", ge=2, help="groups of the N draws (errors by jackknife)")
    batch_size: int | None = spec(kind="integer", ge=1, optional=True,
                                  help="B of mse_at_batch; null: the run's rollouts per step")
    targets: list = spec(kind="list", help=f"gradients to audit against: {', '.join(TARGETS)}")
    seed: int = spec(kind="integer", ge=0, help="seed of the audit's own draws")
    method: str = spec(kind="choice", choices=METHODS,
                       help="auto: enumeration on the exact task, else Monte Carlo")
    refused: bool = spec(kind="bool", help="also the forms training refuses (kl.forms' evidence)")

    @staticmethod
    def check(cfg: DictConfig) -> None:
        check_node("audit", cfg.audit, AuditConfig)
        audit = cfg.audit
        if not audit.targets:
            raise ConfigError(f"audit.targets must name at least one of {', '.join(TARGETS)}")
        for target in audit.targets:
            check_value("audit.targets", target, {"kind": "choice", "choices": TARGETS})
        if audit.samples < audit.groups:
            raise ConfigError(f"audit.samples must be >= audit.groups = {audit.groups} "
                              f"(got {audit.samples})")
        if audit.staleness > 0 and cfg.algo.name not in INNER_UPDATES:
            raise ConfigError(f"audit.staleness > 0 needs an algorithm that updates on one batch "
                              f"({', '.join(INNER_UPDATES)}; got algo={cfg.algo.name})")


def run_config(cfg: DictConfig) -> DictConfig:
    """The run's config without the ``audit`` node (what training validates and builds)."""
    run = cfg.copy()
    with open_dict(run):
        del run["audit"]
    return run


def check(cfg: DictConfig) -> AuditConfig:
    """Check a composed audit config (the run's keys as training does, then ``audit.*``)."""
    validate(run_config(cfg))
    AuditConfig.check(cfg)
    return AuditConfig(**OmegaConf.to_container(cfg.audit, resolve=True))


def compose_audit(args: list[str]) -> DictConfig:
    """Compose conf/audit.yaml with the command line's overrides, as Hydra will, and check it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    check_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("audit", overrides=overrides)
    except Exception as err:  # an unknown key: Hydra's first line names it
        raise ConfigError(str(err).splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()
    check(cfg)
    return cfg


def rollouts_per_step(cfg: Any) -> int:
    """The run's batch of completions per step (mse_at_batch's default B)."""
    algo = cfg.algo
    per_prompt = algo.get("group_size") or algo.get("samples_per_prompt") or 1
    return int(algo.get("prompts_per_step", 1) * per_prompt)
