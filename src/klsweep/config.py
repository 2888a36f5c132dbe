"""Config schemas and validation: every bad value fails before training, in one line that
names the key, the value and what is allowed."""

from __future__ import annotations

import itertools
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from klsweep.kl import ESTIMATORS, SCHEDULES
from klsweep.kl.schedules import _accepted_arguments

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# the kl node's own keys that feed every schedule (the rest come from kl.schedule.*)
_KL_SCHEDULE_ARGS = ("beta", "target", "beta_min", "beta_max")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line for the user."""


def spec(default: Any = MISSING, **meta: Any) -> Any:
    return field(default=default, metadata=meta)


@dataclass
class KLSchema:
    beta: float = spec(kind="number", ge=0)
    target: float = spec(kind="number", ge=0)
    placement: str = spec(kind="choice", choices=("reward", "loss", "none"))
    estimator: str = spec(kind="choice", choices=ESTIMATORS)
    unit: str = spec(kind="choice", choices=("token", "sequence"))
    gradient: str = spec(kind="choice", choices=("estimator", "k2"))
    is_correction: bool = spec(kind="bool")
    clamp: float = spec(kind="number", gt=0)
    beta_min: float = spec(kind="number", ge=0)
    beta_max: float = spec(kind="number", gt=0)
    max: float = spec(kind="number", gt=0)
    schedule: dict = spec(kind="node")


@dataclass
class GRPOSchema:
    name: str = spec(kind="choice", choices=("grpo",))
    kl_placement: str = spec(kind="choice", choices=("reward", "loss", "none"))
    kl_estimator: str = spec(kind="choice", choices=ESTIMATORS)
    prompts_per_step: int = spec(kind="integer", ge=1)
    group_size: int = spec(kind="integer", ge=2)
    scale_rewards: str = spec(kind="choice", choices=("group", "batch", "none"))
    clip_eps: float = spec(kind="number", gt=0)
    loss_agg: str = spec(kind="choice", choices=("token", "sequence"))
    updates_per_rollout: int = spec(kind="integer", ge=1)


@dataclass
class PPOSchema:
    name: str = spec(kind="choice", choices=("ppo",))
    kl_placement: str = spec(kind="choice", choices=("reward", "loss", "none"))
    kl_estimator: str = spec(kind="choice", choices=ESTIMATORS)
    prompts_per_step: int = spec(kind="integer", ge=1)
    samples_per_prompt: int = spec(kind="integer", ge=1)
    ppo_epochs: int = spec(kind="integer", ge=1)
    minibatches: int = spec(kind="integer", ge=1)
    clip_eps: float = spec(kind="number", gt=0)
    vf_clip: float | None = spec(kind="number", gt=0, optional=True)
    vf_coef: float = spec(kind="number", ge=0)
    gamma: float = spec(kind="number", ge=0, le=1)
    lam: float = spec(kind="number", ge=0, le=1)
    whiten_advantages: bool = spec(kind="bool")

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        rollouts = cfg.algo.prompts_per_step * cfg.algo.samples_per_prompt
        if cfg.algo.minibatches > rollouts:
            raise ConfigError(f"algo.minibatches must be <= the rollouts per step, "
                              f"prompts_per_step × samples_per_prompt = {rollouts} "
                              f"(got {cfg.algo.minibatches})")


@dataclass
class DPOSchema:
    name: str = spec(kind="choice", choices=("dpo",))
    kl_placement: str = spec(kind="choice", choices=("none",))
    kl_estimator: str = spec(kind="choice", choices=ESTIMATORS)
    loss: str = spec(kind="choice", choices=("sigmoid", "robust", "ipo", "hinge"))
    label_smoothing: float = spec(kind="number", ge=0, lt=0.5)
    ipo_normalize: bool = spec(kind="bool")
    labels: str = spec(kind="choice", choices=("bradley_terry", "deterministic"))
    online: bool = spec(kind="bool")
    pairs_per_step: int = spec(kind="integer", ge=1)
    dataset_pairs: int = spec(kind="integer", ge=1)
    eval_every: int = spec(kind="integer", ge=1)
    eval_prompts: int = spec(kind="integer", ge=1)
    eval_samples_per_prompt: int = spec(kind="integer", ge=1)

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        if cfg.kl.placement != "none":
            raise ConfigError(f"kl.placement must be none for algo=dpo: DPO's β is the KL "
                              f"coefficient of its own loss (got {_describe(cfg.kl.placement)})")
        if not cfg.kl.beta > 0:
            raise ConfigError(f"kl.beta must be > 0 for algo=dpo: it is DPO's β "
                              f"(got {cfg.kl.beta})")


@dataclass
class DigitsSchema:
    name: str = spec(kind="choice", choices=("digits",))
    prompt_digits: int = spec(kind="integer", ge=1)
    min_len: int = spec(kind="integer", ge=1)
    max_len: int = spec(kind="integer", ge=1)
    p_step: float = spec(kind="number", ge=0, le=1)
    p_stop: float = spec(kind="number", gt=0, le=1)
    reference_steps: int = spec(kind="integer", ge=1)
    reference_batch_size: int = spec(kind="integer", ge=1)
    reference_lr: float = spec(kind="number", gt=0)
    reference_seed: int = spec(kind="integer", ge=0)
    cache_dir: str = spec(kind="string")

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        if cfg.task.min_len > cfg.task.max_len:
            raise ConfigError(f"task.min_len must be <= task.max_len "
                              f"(got {cfg.task.min_len} > {cfg.task.max_len})")


@dataclass
class ExactSchema:
    name: str = spec(kind="choice", choices=("exact",))
    vocab_size: int = spec(kind="integer", ge=2)
    completion_len: int = spec(kind="integer", ge=1)
    prompt_len: int = spec(kind="integer", ge=1)
    n_prompts: int = spec(kind="integer", ge=1)
    p_step: float = spec(kind="number", ge=0, le=1)
    reward_scale: float = spec(kind="number", gt=0)
    eval_every: int = spec(kind="integer", ge=1)
    prompt_seed: int = spec(kind="integer", ge=0)
    reference_steps: int = spec(kind="integer", ge=1)
    reference_batch_size: int = spec(kind="integer", ge=1)
    reference_lr: float = spec(kind="number", gt=0)
    reference_seed: int = spec(kind="integer", ge=0)
    cache_dir: str = spec(kind="string")

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        task = cfg.task
        prompts = task.vocab_size ** task.prompt_len
        if task.n_prompts > prompts:
            raise ConfigError(f"task.n_prompts must be <= task.vocab_size**task.prompt_len = "
                              f"{prompts} distinct prompts (got {task.n_prompts})")
        sequences = task.n_prompts * task.vocab_size ** task.completion_len
        if sequences > EXACT_MAX_SEQUENCES:
            raise ConfigError(f"task.n_prompts × task.vocab_size**task.completion_len must be "
                              f"<= {EXACT_MAX_SEQUENCES} to enumerate (got {sequences})")


# the exact task enumerates n_prompts × vocab_size**completion_len sequences at each evaluation
EXACT_MAX_SEQUENCES = 2**18


@dataclass
class TinyModelSchema:
    name: str = spec(kind="choice", choices=("tiny",))
    n_layer: int = spec(kind="integer", ge=1)
    n_head: int = spec(kind="integer", ge=1)
    n_embd: int = spec(kind="integer", ge=1)
    dropout: float = spec(kind="number", ge=0, lt=1)


@dataclass
class TrainerSchema:
    accelerator: str = spec(kind="choice", choices=("auto", "cpu", "gpu", "cuda", "mps"))
    devices: int = spec(kind="integer", ge=-1)
    precision: str = spec(kind="choice", choices=(
        "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"))
    strategy: str = spec(kind="string")
    enable_progress_bar: bool = spec(kind="bool")


@dataclass
class OptimSchema:
    lr: float = spec(kind="number", gt=0)
    weight_decay: float = spec(kind="number", ge=0)
    betas: list = spec(kind="list")
    grad_clip: float = spec(kind="number", ge=0)


@dataclass
class RolloutSchema:
    temperature: float = spec(kind="number", gt=0)


@dataclass
class CheckpointSchema:
    every: int = spec(kind="integer", ge=1)


@dataclass
class TrialSchema:
    storage: str | None = spec(kind="string", optional=True)
    study_name: str | None = spec(kind="string", optional=True)
    number: int | None = spec(kind="integer", ge=0, optional=True)


@dataclass
class LoggerSchema:
    name: str = spec(kind="choice", choices=("wandb", "csv", "none"))
    project: str = spec("klsweep", kind="string")
    group: str | None = spec(None, kind="string", optional=True)
    mode: str = spec("auto", kind="choice", choices=("auto", "online", "offline"))


ALGO_SCHEMAS: dict[str, type] = {"grpo": GRPOSchema, "ppo": PPOSchema, "dpo": DPOSchema}
TASK_SCHEMAS: dict[str, type] = {"digits": DigitsSchema, "exact": ExactSchema}
MODEL_SCHEMAS: dict[str, type] = {"tiny": TinyModelSchema}


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    """Raise ConfigError unless ``value`` fits the field description ``meta``."""
    kind = meta.get("kind")
    if value is None and meta.get("optional"):
        return
    got = f"(got {_describe(value)})"
    if kind in ("number", "integer"):
        is_int = isinstance(value, int) and not isinstance(value, bool)
        ok = is_int if kind == "integer" else (is_int or isinstance(value, float))
        noun = "an integer" if kind == "integer" else "a number"
        bounds = [f"{op} {meta[name]}" for name, op in
                  (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if name in meta]
        wanted = f"{noun}{' ' + ' and '.join(bounds) if bounds else ''}"
        if not ok or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{key} must be {wanted} {got}")
        if not (value >= meta.get("ge", -math.inf) and value > meta.get("gt", -math.inf)
                and value <= meta.get("le", math.inf) and value < meta.get("lt", math.inf)):
            raise ConfigError(f"{key} must be {wanted} {got}")
    elif kind == "choice":
        if value not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"])
            raise ConfigError(f"{key} must be one of {allowed} {got}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false {got}")
    elif kind == "string":
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string {got}")
    elif kind == "list":
        if not isinstance(value, (list, tuple, ListConfig)):
            raise ConfigError(f"{key} must be a list {got}")
    elif kind == "node":
        if not isinstance(value, (dict, DictConfig)):
            raise ConfigError(f"{key} must be a config node {got}")


def check_node(prefix: str, node: Any, schema: type) -> None:
    """Check every field of ``node`` against the dataclass ``schema``: no unknown keys,
    no missing keys, every value of the right kind and range."""
    if not isinstance(node, (dict, DictConfig)):
        raise ConfigError(f"{prefix} must be a config node (got {_describe(node)})")
    names = [f.name for f in fields(schema)]
    for key in node:
        if key not in names:
            raise ConfigError(f"{prefix}.{key} is not a known key "
                              f"(allowed under {prefix}: {', '.join(names)})")
    for f in fields(schema):
        if f.name not in node:
            if f.default is MISSING:
                raise ConfigError(f"{prefix}.{f.name} is missing")
            continue
        check_value(f"{prefix}.{f.name}", node[f.name], dict(f.metadata))


def _check_schedule(kl: DictConfig) -> None:
    schedule = kl.schedule
    name = schedule.get("name")
    if name not in SCHEDULES:
        raise ConfigError(f"kl.schedule.name must be one of {', '.join(SCHEDULES)} "
                          f"(got {_describe(name)})")
    cls = SCHEDULES[name]
    accepted = _accepted_arguments(cls) - set(_KL_SCHEDULE_ARGS)
    for key, value in schedule.items():
        if key == "name":
            continue
        if key not in accepted:
            raise ConfigError(f"kl.schedule.{key} is not an option of schedule={name} "
                              f"(allowed: {', '.join(sorted(accepted)) or 'none'})")
        check_value(f"kl.schedule.{key}", value, {"kind": "number"})
    if cls.needs_target and not kl.target > 0:
        raise ConfigError(f"kl.target must be > 0 for schedule={name} (got {kl.target})")
    if kl.beta_min > kl.beta_max:
        raise ConfigError(f"kl.beta_min must be <= kl.beta_max "
                          f"(got {kl.beta_min} > {kl.beta_max})")
    try:
        build_schedule(kl)
    except ValueError as err:
        raise ConfigError(f"kl.schedule (schedule={name}): {err}") from None


def build_schedule(kl: DictConfig):
    """The β schedule that the ``kl`` node describes."""
    from klsweep.kl import make_schedule

    params = {k: v for k, v in kl.schedule.items() if k != "name"}
    return make_schedule(kl.schedule.name, **{k: kl[k] for k in _KL_SCHEDULE_ARGS}, **params)


def _check_choice_node(key: str, node: Any, schemas: dict[str, type]) -> None:
    name = node.get("name") if isinstance(node, (dict, DictConfig)) else None
    if name not in schemas:
        raise ConfigError(f"{key}.name must be one of {', '.join(schemas)} (got {_describe(name)})")
    check_node(key, node, schemas[name])


def validate(cfg: DictConfig) -> None:
    """Check a composed run config; raise ConfigError with one line on the first problem."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # an interpolation or ??? left unfilled
        raise ConfigError(str(err).splitlines()[0]) from None
    known = {"seed", "threads", "name", "steps", "kl", "optim", "rollout", "checkpoint", "trial",
             "algo", "task", "model", "trainer", "logger", "hydra"}
    for key in cfg:
        if key not in known:
            raise ConfigError(f"{key} is not a known key (allowed: {', '.join(sorted(known))})")
    check_value("seed", cfg.seed, {"kind": "integer", "ge": 0})
    check_value("threads", cfg.threads, {"kind": "integer", "ge": 1, "optional": True})
    check_value("name", cfg.name, {"kind": "string", "optional": True})
    check_value("steps", cfg.steps, {"kind": "integer", "ge": 1})
    _check_choice_node("algo", cfg.algo, ALGO_SCHEMAS)
    check_node("kl", cfg.kl, KLSchema)
    _check_schedule(cfg.kl)
    _check_choice_node("task", cfg.task, TASK_SCHEMAS)
    _check_choice_node("model", cfg.model, MODEL_SCHEMAS)
    if cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(f"model.n_embd must be a multiple of model.n_head "
                          f"(got {cfg.model.n_embd} and {cfg.model.n_head})")
    check_node("trainer", cfg.trainer, TrainerSchema)
    check_node("optim", cfg.optim, OptimSchema)
    check_node("rollout", cfg.rollout, RolloutSchema)
    check_node("checkpoint", cfg.checkpoint, CheckpointSchema)
    check_node("trial", cfg.trial, TrialSchema)
    check_node("logger", cfg.logger, LoggerSchema)
    for schema in (ALGO_SCHEMAS[cfg.algo.name], TASK_SCHEMAS[cfg.task.name]):
        check_run = getattr(schema, "check_run", None)
        if check_run is not None:  # checks that span several keys of the config
            check_run(cfg)


# ---------------------------------------------------------------------------------------------
# Checks on the command line, before Hydra creates a run dir


def config_groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """Every config group of conf/ and its options."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(conf_dir.iterdir()) if d.is_dir() and d.name != "hydra"}


def check_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> list[dict[str, str]]:
    """Check the command line's group choices and keys; return the list of concrete
    override sets (one per job of a basic grid) to compose and validate."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except OverrideParseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    groups = config_groups(conf_dir)
    axes: list[list[tuple[str, str]]] = []
    for override in overrides:
        key = override.key_or_group
        if key.startswith("hydra") or override.is_delete():
            continue
        if override.is_sweep_override():
            try:
                values = list(override.sweep_string_iterator())
            except Exception:  # interval, tag(...): a search space for the Optuna sweeper
                continue
        else:
            values = [override.get_value_element_as_str()]
        if key in groups:
            for value in values:
                if value not in groups[key] and value != "null":
                    raise ConfigError(f"{key}={value} is not a known choice "
                                      f"(allowed: {', '.join(groups[key])})")
        axes.append([(override.input_line.split("=", 1)[0], v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def compose_and_validate(overrides: dict[str, str], conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose the run config for ``overrides`` as Hydra would, and validate it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    group_names = set(config_groups(conf_dir))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        groups_only = [f"{k}={v}" for k, v in overrides.items() if k.lstrip("+~") in group_names]
        base = compose("config", overrides=groups_only)
        for key in overrides:
            plain = key.lstrip("+~")
            if key.startswith("+") or plain in group_names:
                continue
            parent, _, leaf = plain.rpartition(".")
            node = OmegaConf.select(base, parent) if parent else base
            if not isinstance(node, DictConfig) or leaf not in node:
                siblings = ", ".join(str(k) for k in node) if isinstance(node, DictConfig) else ""
                where = f" (allowed under {parent}: {siblings})" if parent and siblings else ""
                raise ConfigError(f"{plain} is not a known key{where}")
        cfg = compose("config", overrides=[f"{k}={v}" for k, v in overrides.items()])
    GlobalHydra.instance().clear()
    validate(cfg)
    return cfg
