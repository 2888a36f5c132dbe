"""reasoning-gym's datasets as ``task=reasoning`` uses them: one by name with its options, or
several with weights through reasoning-gym's composite; the training pool and the held-out
evaluation set, which never share a question; and the checks that refuse a bad dataset
setting in one line before training.

Seeds: reasoning-gym draws item i of a dataset made with seed S from ``Random(S + i)`` (97 of
its 106 datasets do; a composite also draws sub-dataset j's item i from S + j + 1 + i). The
training pool (``task.train_seed``, ``task.train_size`` items) and the evaluation set
(``task.eval_seed``) must therefore occupy disjoint seed ranges, which is checked; and since
a small dataset repeats its questions under any seeds, every training item whose question
text is in the evaluation set is dropped from the pool.

reasoning-gym is imported where it is used (1.2 s): runs of other tasks never pay for it.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from klsweep.schema import ConfigError

COMPOSITE = "composite"
# scanned for held-out questions before giving up: eval.prompts distinct ones are needed
_MAX_EVAL_SCAN = 100


@dataclass(frozen=True)
class Source:
    """What makes the questions: a reasoning-gym dataset and its options, or a composite of
    several (``parts``: (name, weight, options), weights > 0). ``key`` is its JSON form, a
    hashable identity for caches."""

    name: str
    options: str          # JSON of the dataset's options (empty for a composite)
    parts: tuple[tuple[str, float, str], ...] = ()

    @property
    def n_datasets(self) -> int:
        return len(self.parts)

    def describe(self) -> str:
        if not self.parts:
            return self.name
        return "composite of " + ", ".join(f"{name} ({weight:g})" for name, weight, _ in self.parts)


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def gym() -> Any:
    import reasoning_gym

    return reasoning_gym


def dataset_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def check_name(name: Any, key: str) -> None:
    """An unknown dataset name, refused with the closest known ones."""
    names = dataset_names()
    if name in names:
        return
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"{len(names)} datasets, e.g. chain_sum"
    raise ConfigError(f"{key}={name!r} is not a reasoning-gym dataset ({hint})")


def check_options(name: str, options: dict[str, Any], key: str) -> None:
    """Options the dataset rejects, refused with reasoning-gym's own reason in one line."""
    from reasoning_gym.factory import DATASETS

    config_cls = DATASETS[name][1]
    allowed = [f.name for f in fields(config_cls) if f.name not in ("seed", "size")]
    unknown = [option for option in options if option not in allowed]
    if unknown:
        raise ConfigError(f"{key} has {', '.join(unknown)}, not an option of {name} "
                          f"(allowed: {', '.join(allowed)}; {key}=null clears the options, "
                          f"+{key}.OPTION=VALUE adds one)")
    try:
        gym().create_dataset(name, size=1, seed=0, **options)[0]
    except Exception as err:  # the dataset's own validation: an assert, a ValueError, ...
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0] if lines else type(err).__name__
        raise ConfigError(f"{key} is rejected by {name}: {reason} "
                          f"(got {json.dumps(options)})") from None


def source_of(dataset: Any, dataset_config: Any, datasets: Any) -> Source:
    """The checked ``Source`` of ``task.dataset``, ``task.dataset_config`` and
    ``task.datasets``; raises ConfigError in one line."""
    dataset_config, datasets = _plain(dataset_config) or {}, _plain(datasets)
    if not isinstance(dataset_config, dict):
        raise ConfigError(f"task.dataset_config must be a mapping of the dataset's options "
                          f"(got {dataset_config!r})")
    if dataset != COMPOSITE:
        if datasets is not None:
            raise ConfigError(f"task.datasets is read with task.dataset={COMPOSITE} only "
                              f"(got task.dataset={dataset!r}): set one or the other")
        check_name(dataset, "task.dataset")
        check_options(dataset, dataset_config, "task.dataset_config")
        return Source(dataset, json.dumps(dataset_config, sort_keys=True))
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError(f"task.dataset={COMPOSITE} needs task.datasets, a mapping "
                          f"{{name: {{weight: w, config: {{...}}}}}} (got {datasets!r})")
    parts = []
    for name, part in datasets.items():
        key = f"task.datasets.{name}"
        part = part or {}
        if not isinstance(part, dict) or set(part) - {"weight", "config"}:
            raise ConfigError(f"{key} must be a mapping with weight and config (got {part!r})")
        weight, options = part.get("weight", 1.0), part.get("config") or {}
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"{key}.weight must be a number >= 0 (got {weight!r})")
        check_name(name, key)
        check_options(name, options, f"{key}.config")
        if weight > 0:  # a weight of 0 leaves a dataset out
            parts.append((name, float(weight), json.dumps(options, sort_keys=True)))
    if not parts:
        raise ConfigError(f"task.datasets has no weight left: every weight is 0 "
                          f"(got {', '.join(datasets)}); give one a weight > 0")
    return Source(COMPOSITE, "{}", tuple(parts))


def make_dataset(source: Source, size: int, seed: int) -> Any:
    """The reasoning-gym dataset of ``source`` with ``size`` items from ``seed``."""
    rg = gym()
    if not source.parts:
        return rg.create_dataset(source.name, size=size, seed=seed, **json.loads(source.options))
    from reasoning_gym.composite import DatasetSpec

    specs = [DatasetSpec(name, weight, json.loads(options))
             for name, weight, options in source.parts]
    return rg.create_dataset(COMPOSITE, size=size, seed=seed, datasets=specs)


def seed_range(source: Source, seed: int, items: int) -> range:
    """The seeds the first ``items`` items of ``source`` are drawn from (see the module's
    docstring)."""
    return range(seed, seed + items + source.n_datasets)


@dataclass
class Questions:
    """The items of a dataset a run uses: ``entries`` (reasoning-gym's dicts: question,
    answer, metadata), the dataset that scores them, and the seeds they came from."""

    dataset: Any
    entries: list[dict[str, Any]]
    seeds: range


@functools.lru_cache(maxsize=8)
def evaluation_set(source: Source, seed: int, prompts: int) -> Questions:
    """``prompts`` items of distinct questions from ``seed`` on, the first ones found."""
    scan = prompts * _MAX_EVAL_SCAN
    dataset = make_dataset(source, scan, seed)
    entries, seen = [], set()
    for index in range(scan):
        entry = dataset[index]
        if entry["question"] not in seen:
            seen.add(entry["question"])
            entries.append(entry)
            if len(entries) == prompts:
                return Questions(dataset, entries, seed_range(source, seed, index + 1))
    raise ConfigError(f"eval.prompts={prompts} held-out questions are more than "
                      f"{source.describe()} has ({len(entries)} distinct in {scan} items)")


@functools.lru_cache(maxsize=8)
def training_pool(source: Source, seed: int, size: int, held_out: frozenset[str]) -> Questions:
    """``size`` items from ``seed`` on, less every one whose question is ``held_out``."""
    dataset = make_dataset(source, size, seed)
    entries = [entry for entry in (dataset[i] for i in range(size))
               if entry["question"] not in held_out]
    if not entries:
        raise ConfigError(f"task.train_size={size} items of {source.describe()} are all "
                          f"held-out questions: no training question is left")
    return Questions(dataset, entries, seed_range(source, seed, size))


def check_disjoint(train: range, held_out: range) -> None:
    if train.start < held_out.stop and held_out.start < train.stop:
        raise ConfigError(f"task.train_seed and task.eval_seed must draw from disjoint seeds: "
                          f"training items use seeds {train.start}..{train.stop - 1}, held-out "
                          f"ones {held_out.start}..{held_out.stop - 1}")
