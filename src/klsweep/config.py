"""Validation glue: every bad value fails before training, in one line that names the key,
the value and what is allowed. Each config group's typed dataclass lives next to the code it
configures (``algos/``, ``tasks/``, ``models/``, ``policy.KLConfig``, ``records``); this
module finds them through the registries, and declares only the run-level nodes that
``train.py`` itself consumes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from klsweep.algos import ALGORITHMS
from klsweep.engines import ENGINES, check_engine
from klsweep.engines.correction import AUTO, MODES, resolve
from klsweep.kl import SCHEDULES
from klsweep.kl.schedules import _accepted_arguments
from klsweep.models import MODELS
from klsweep.policy import KLConfig, kl_settings
from klsweep.schema import ConfigError, check_nodes, describe, from_node, spec
from klsweep.tasks import TASKS, EvalConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# the kl node's own keys that feed every schedule (the rest come from kl.schedule.*)
_KL_SCHEDULE_ARGS = ("beta", "target", "beta_min", "beta_max")

__all__ = ["ConfigError", "build_schedule", "compose_and_validate", "settle", "validate"]


@dataclass
class RunConfig:
    """The top-level values of a run."""

    seed: int = spec(kind="integer", ge=0, help="seed of the run (prompts, sampling, init)")
    threads: int | None = spec(kind="integer", ge=1, optional=True,
                               help="torch CPU threads per run; null: torch's default")
    name: str | None = spec(kind="string", optional=True,
                            help="run name; null: algo-estimator-schedule-s<seed>")
    steps: int = spec(kind="integer", ge=1, help="policy updates (rollouts)")
    resume: str = spec(kind="string",
                       help="auto: continue the run dir's unfinished run | never | a run dir")


# what Lightning's ModelParallelStrategy accepts ("32" is "32-true"); 16-mixed's gradient
# scaler and 64-true are not among them
FSDP_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true")


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` arguments (the trainer group)."""

    accelerator: str = spec(kind="choice", choices=("auto", "cpu", "gpu", "cuda", "mps"),
                            help="Lightning accelerator")
    devices: int = spec(kind="integer", ge=-1, help="devices (-1: all)")
    num_nodes: int = spec(kind="integer", ge=1,
                          help="machines the run spans (several: launched by srun, one task "
                               "per device)")
    precision: str = spec(kind="choice", choices=(
        "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
        help="Lightning precision")
    strategy: str = spec(kind="string",
                         help="Lightning strategy (auto, ddp; fsdp: FSDP2, klsweep.trainer)")
    activation_checkpointing: bool = spec(kind="bool",
                                          help="fsdp: recompute each decoder layer's activations")
    enable_progress_bar: bool = spec(kind="bool", help="the progress bar")

    @staticmethod
    def check_run(cfg: Any) -> None:
        """Lightning's ModelParallelStrategy (trainer=fsdp) takes these precisions only, and
        says so with a stack trace from inside the Trainer: say it in one line first."""
        trainer = cfg.trainer
        if trainer.strategy == "fsdp" and trainer.precision not in FSDP_PRECISIONS:
            raise ConfigError(f"trainer.strategy=fsdp takes trainer.precision "
                              f"{', '.join(FSDP_PRECISIONS)} (got {trainer.precision})")


@dataclass
class OptimConfig:
    """AdamW on the policy's trainable parameters (and an algorithm's own module)."""

    lr: float | None = spec(kind="number", gt=0, optional=True,
                            help="learning rate; null: the model's default (model.lr ...)")
    weight_decay: float = spec(kind="number", ge=0, help="AdamW weight decay")
    betas: list = spec(kind="list", help="AdamW betas")
    grad_clip: float = spec(kind="number", ge=0, help="max global grad norm; 0: none")


@dataclass
class RolloutConfig:
    """Sampling: the temperature, the engine that samples and how it follows the policy."""

    temperature: float = spec(kind="number", gt=0,
                              help="sampling temperature; log-probs and KL use the same")
    engine: str = spec(kind="choice", choices=ENGINES,
                       help="native: klsweep's decoding loop | vllm: a vLLM engine")
    lag: int = spec(kind="integer", ge=0,
                    help="steps the sampling weights lag the trainer's; > 0: the engine in its "
                         "own process, sampling while the trainer trains")
    threads: int = spec(kind="integer", ge=1, help="CPU threads of the engine's process (lag > 0)")
    sync_every: int = spec(kind="integer", ge=1,
                           help="rollouts between weight syncs into the engine")
    correction: str = spec(kind="choice", choices=(AUTO, *MODES),
                           help="importance weights on the policy-gradient term (TRL's names; "
                                "decoupled: AReaL's); auto: token_truncate with a cap or a lag")
    tis_cap: float | None = spec(kind="number", gt=0, optional=True,
                                 help="the cap C of rollout.correction's weights; null: off "
                                      "under auto at lag 0, else 2")
    gpu_memory_utilization: float = spec(kind="number", gt=0, le=1,
                                         help="vllm: share of GPU memory for the engine")
    kv_cache_gib: float | None = spec(kind="number", gt=0, optional=True,
                                      help="vllm: KV cache size in GiB; null: vLLM's choice")
    enforce_eager: bool = spec(kind="bool", help="vllm: no CUDA graphs / compilation")

    @staticmethod
    def check_run(cfg: Any) -> None:
        check_engine(cfg)


@dataclass
class CheckpointConfig:
    """checkpoints/last.ckpt and best.ckpt: what a resumed run continues from."""

    every: int = spec(kind="integer", ge=1, help="steps between checkpoints (and the last)")


@dataclass
class TrialConfig:
    """Filled by the Optuna sweeper for pruning; null for plain runs."""

    storage: str | None = spec(kind="string", optional=True, help="the study's storage")
    study_name: str | None = spec(kind="string", optional=True, help="the study")
    number: int | None = spec(kind="integer", ge=0, optional=True, help="the trial")


# node -> its dataclass, for the nodes that have one whatever the choices
RUN_NODES: dict[str, type] = {"kl": KLConfig, "trainer": TrainerConfig, "optim": OptimConfig,
                              "rollout": RolloutConfig, "checkpoint": CheckpointConfig,
                              "trial": TrialConfig, "eval": EvalConfig}
# group -> choice name -> its dataclass
CHOICE_NODES: dict[str, dict[str, type]] = {
    "algo": {name: algo.Config for name, algo in ALGORITHMS.items()},
    "task": {name: task.Config for name, task in TASKS.items()},
    "model": {name: kind.Config for name, kind in MODELS.items()},
}


def logger_schema(node: Any) -> type | None:
    """The dataclass that the logger node's ``_target_`` names (None: no logger)."""
    from hydra.utils import get_class

    target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
    if target is None:
        return None
    try:
        return get_class(target)
    except Exception:
        raise ConfigError(f"logger._target_ must name an importable logger config class "
                          f"(got {describe(target)})") from None


def schedule_schema(node: Any) -> type:
    """The dataclass of a ``kl.schedule`` node: its name, and one number per argument of
    the schedule it names beyond the kl node's own (``_KL_SCHEDULE_ARGS``), read from the
    schedule's class so that a schedule declares its options once."""
    name = node.get("name") if isinstance(node, (dict, DictConfig)) else None
    if name not in SCHEDULES:
        raise ConfigError(f"kl.schedule.name must be one of {', '.join(SCHEDULES)} "
                          f"(got {describe(name)})")
    accepted = sorted(_accepted_arguments(SCHEDULES[name]) - set(_KL_SCHEDULE_ARGS))
    options = [(arg, float, spec(None, kind="number", help=f"schedule={name}'s {arg}"))
               for arg in accepted]
    return make_dataclass(
        f"{SCHEDULES[name].__name__}Config",
        [("name", str, spec(kind="choice", choices=tuple(SCHEDULES), help="the β schedule")),
         *options], namespace={"check_run": staticmethod(_check_schedule)})


def _check_schedule(cfg: DictConfig) -> None:
    kl = cfg.kl
    name = kl.schedule.name
    if SCHEDULES[name].needs_target and not kl.target > 0:
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


def choice_key(group: str) -> str:
    """The key that says which choice a group's node is: ``model.kind``, since a model's
    ``name`` is its checkpoint; ``name`` elsewhere."""
    return "kind" if group == "model" else "name"


def _choice_schema(group: str, node: Any) -> type:
    """The dataclass of the choice a group's node names; a name that is none of them fails
    in one line."""
    schemas, key = CHOICE_NODES[group], choice_key(group)
    name = node.get(key) if isinstance(node, (dict, DictConfig)) else None
    if name not in schemas:
        raise ConfigError(f"{group}.{key} must be one of {', '.join(schemas)} "
                          f"(got {describe(name)})")
    return schemas[name]


def node_schemas(cfg: DictConfig) -> list[tuple[str, type]]:
    """(node, dataclass) for every node of a composed run config, '' the run's own values:
    what validation checks and ``--help`` shows, resolved once."""
    chosen = [(group, _choice_schema(group, cfg[group])) for group in CHOICE_NODES]
    logger = logger_schema(cfg.logger)
    return [("", RunConfig), *chosen, *RUN_NODES.items(),
            ("kl.schedule", schedule_schema(cfg.kl.schedule)),
            *([("logger", logger)] if logger is not None else [])]


def validate(cfg: DictConfig) -> None:
    """Check a composed run config; raise ConfigError with one line on the first problem."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # an interpolation or ??? left unfilled
        raise ConfigError(str(err).splitlines()[0]) from None
    known = {*(f.name for f in fields(RunConfig)), *RUN_NODES, *CHOICE_NODES, "logger", "hydra"}
    for key in cfg:
        if key not in known:
            raise ConfigError(f"{key} is not a known key (allowed: {', '.join(sorted(known))})")
    check_nodes(cfg, node_schemas(cfg))


def settle(cfg: DictConfig) -> DictConfig:
    """Write into a validated ``cfg`` the value that each ``auto`` stands for
    (``kl.is_correction``, which the audit's table decides, off-policy at ``rollout.lag`` > 0:
    ``kl_settings``; ``rollout.correction`` and its cap), so that --help, the record and W&B
    show what runs."""
    cfg.kl.is_correction = kl_settings(cfg.kl, cfg.rollout.lag).is_correction
    cfg.rollout.correction, cfg.rollout.tis_cap = resolve(cfg.rollout.correction,
                                                          cfg.rollout.tis_cap, cfg.rollout.lag)
    return cfg


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


def _check_keys_exist(base: DictConfig, overrides: dict[str, str], group_names: set[str]) -> None:
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


def compose_and_validate(overrides: dict[str, str], conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose the run config for ``overrides`` as Hydra would, and validate it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    group_names = set(config_groups(conf_dir))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        try:
            cfg = compose("config", overrides=[f"{k}={v}" for k, v in overrides.items()])
        except HydraException:
            # Hydra's message for a key that does not exist names neither the keys allowed
            # nor where: compose the groups alone to say so, and else give Hydra's own
            _check_keys_exist(compose("config", overrides=[
                f"{k}={v}" for k, v in overrides.items() if k.lstrip("+~") in group_names]),
                overrides, group_names)
            raise
    GlobalHydra.instance().clear()
    validate(cfg)
    return settle(cfg)


def choice_config(group: str, choice: str, **overrides: Any) -> Any:
    """The typed config of one choice with the defaults of its YAML
    (``conf/<group>/<choice>.yaml``), and ``overrides``: the Python API's way to build, say,
    a task without composing a whole run."""
    node = OmegaConf.merge(OmegaConf.load(CONF_DIR / group / f"{choice}.yaml"), overrides)
    return from_node(CHOICE_NODES[group][choice], OmegaConf.to_container(node, resolve=True))


def options_help(cfg: DictConfig, conf_dir: Path = CONF_DIR) -> str:
    """``--help``: the config groups and their choices, then every option of the composed
    config with its value and its help line, read from the same dataclasses that validate."""
    lines = ["== Config groups (group=choice) =="]
    lines += [f"  {group}: {', '.join(choices)}"
              for group, choices in config_groups(conf_dir).items()]
    for node, schema in node_schemas(cfg):
        lines.append(f"\n== {node or 'run'} ==")
        values = OmegaConf.select(cfg, node) if node else cfg
        for f in fields(schema):
            key = f"{node}.{f.name}" if node else f.name
            value = OmegaConf.select(values, f.name) if f.name in values else None
            if isinstance(value, DictConfig):
                value = "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) \
                else value
            lines.append(f"  {key}={shown}".ljust(40) + f"  {f.metadata.get('help', '')}")
    return "\n".join(lines)
