"""The site: its generated references cover every option validation checks and every name a
run logs, and every command of the Getting started pages runs as printed. (`.ci/run` builds
the whole site with `mkdocs build --strict`: a broken link, anchor or page fails it.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from klsweep.config import CONF_DIR, config_groups, node_schemas
from klsweep.metrics import METRICS, SUMMARY
from klsweep.schema import dataclass_type
from klsweep.site.configuration import configuration_page
from klsweep.site.metrics_page import metrics_page
from klsweep.site.tables import anchor
from tests.conftest import REPO, TINY, run_klsweep

GETTING_STARTED = REPO / "docs" / "getting-started"
# a group's choices that each have a table of their own, linked as #<group>=<choice>.<field>
PER_CHOICE = {"algo": "algo", "task": "task", "model": "model", "logger": "logger",
              "kl.schedule": "schedule"}


def _composed(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def _options(prefix: str, schema: type, anchor_base: str) -> dict[str, str]:
    """{anchor: dotted key} of every field of ``schema`` at ``prefix``, nested nodes too."""
    out = {}
    for f in fields(schema):
        key, link = (f"{prefix}.{f.name}" if prefix else f.name), f"{anchor_base}.{f.name}"
        out[anchor(link.lstrip("."))] = key
        inner = dataclass_type(schema, f.type)
        if inner is not None:
            out |= _options(key, inner, link)
    return out


def test_the_configuration_reference_lists_every_option_of_every_choice():
    """What validation checks (``node_schemas`` of a config composed with each choice of
    each group) is what the page lists, each option under its own anchor."""
    page = configuration_page()
    anchors = set(re.findall(r'<span id="([^"]+)"></span>', page))
    expected: dict[str, str] = {}
    for group, choices in config_groups().items():
        for choice in choices:
            if group == "sweep":  # a preset sets keys of other nodes: its own table
                assert f"{{#sweep-{choice}}}" in page
                continue
            if group == "estimator":  # it sets kl.estimator alone
                assert f"| `{choice}` | `kl.estimator: {choice}` |" in page
                continue
            cfg = _composed([f"{group}={choice}"])
            chosen = cfg.hydra.runtime.choices
            for node, schema in node_schemas(cfg):
                per_choice = PER_CHOICE.get(node)
                base = f"{per_choice}={chosen[per_choice]}" if per_choice else node
                expected |= _options(node, schema, base)
    missing = sorted(key for link, key in expected.items() if link not in anchors)
    assert not missing, f"options missing from the configuration reference: {missing}"
    assert len(expected) > 150  # every group's choices were composed, not a few


def test_the_sweepers_launchers_and_audits_options_are_listed_with_their_help():
    from hydra_plugins.klsweep_local.config import KLSweepLocalLauncherConf
    from hydra_plugins.klsweep_optuna.config import BudgetPruningConf, KLSweepOptunaConf
    from klsweep.audit.config import AuditConfig

    page = configuration_page()
    for node, schema in (("hydra.sweeper", KLSweepOptunaConf),
                         ("hydra.sweeper.budget_pruning", BudgetPruningConf),
                         ("hydra.launcher", KLSweepLocalLauncherConf), ("audit", AuditConfig)):
        for f in fields(schema):
            if f.name == "_target_":
                continue
            assert f'id="{node}.{f.name}"' in page, f"{node}.{f.name}"
            assert f.metadata.get("help"), f"{node}.{f.name} has no help line"


def test_every_declared_metric_is_in_the_metrics_reference():
    page = metrics_page()
    for metric in METRICS.values():
        assert f'id="{anchor(metric.name)}"' in page
        assert f"`{metric.summary_name}`" in page if metric.summary_name else True
    for metric in SUMMARY.values():
        assert f'id="{anchor("summary-" + metric.name)}"' in page


@pytest.mark.slow
def test_every_name_a_default_run_logs_is_in_the_metrics_reference(tmp_path):
    """The default command (GRPO on digits, W&B offline) on tiny settings: each key of its
    metrics.jsonl rows and of its summary.json is documented in the page."""
    run_dir = tmp_path / "run"
    result = run_klsweep(*TINY, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    page = metrics_page()
    logged = {key for row in rows for key in row}
    assert {"kl/mean", "kl/k3", "reward/mean", "policy/clipfrac"} <= logged
    for key in logged:
        assert f'id="{anchor(key)}"' in page, key
    for key in summary:
        assert f"`{key}`" in page, key


def _bash_commands(page: Path) -> list[str]:
    """The commands of a page's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"(^|\s+)#.*$", "", line).strip()
            if command:
                commands.append(command)
    return commands


def test_the_install_commands_name_the_pins_and_extras_that_exist():
    """pip's commands cannot run here (they would change this environment): each names the
    torch that .ci/run installs and only extras that pyproject.toml declares."""
    pyproject = (REPO / "pyproject.toml").read_text()  # tomllib is Python 3.11's; 3.10 is ours
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, flags=re.M))
    assert {"dev", "docs"} <= extras
    ci_torch = re.search(r"torch==[\d.]+", (REPO / ".ci" / "run").read_text())[0]
    installs = [part.strip() for p in sorted(GETTING_STARTED.glob("*.md"))
                for command in _bash_commands(p) for part in command.split("&&")
                if part.strip().startswith("pip install")]
    assert installs
    for part in installs:
        for word in shlex.split(part)[2:]:
            if word.startswith("torch"):
                assert word == ci_torch, f"{part}: .ci/run installs {ci_torch}"
            elif word.startswith(".["):
                assert set(word[2:-1].split(",")) <= extras, part


@pytest.mark.slow
def test_every_command_of_the_getting_started_pages_runs_as_printed(tmp_path):
    """Each page's commands, in order, in a fresh directory of its own (a later command reads
    what an earlier one wrote), with this environment's ``python``; pip's are checked
    above."""
    for page in sorted(GETTING_STARTED.glob("*.md")):
        commands = [c for c in _bash_commands(page) if not c.startswith("pip ")]
        workdir = tmp_path / page.stem
        workdir.mkdir()
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        for command in commands:
            result = subprocess.run(["bash", "-c", command], cwd=workdir, env=env,
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"{page.name}: {command}\n{result.stderr[-2000:]}"
