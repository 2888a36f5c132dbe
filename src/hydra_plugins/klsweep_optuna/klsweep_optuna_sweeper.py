"""The Sweeper that Hydra instantiates for ``hydra/sweeper: klsweep_optuna``."""

from __future__ import annotations

import sys
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class KLSweepOptunaSweeper(Sweeper):
    """An Optuna study over the run config: ask a batch of trials, launch it through the
    configured Hydra launcher, tell each trial what its run returned (see ``_sweep``)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.create(settings)
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        # Optuna is imported only when a sweep runs: Hydra imports this module on every start
        from hydra_plugins.klsweep_optuna._errors import SweepError
        from hydra_plugins.klsweep_optuna._sweep import OptunaSweep

        assert self.config is not None and self.hydra_context is not None
        try:
            return OptunaSweep(self.settings, self.config, self.hydra_context, self.launcher
                               ).run(arguments)
        except SweepError as err:
            # one line, as klsweep's command-line checks print it, without Hydra's hint
            # about stack traces: there is no trace worth reading
            print(err, file=sys.stderr)
            sys.exit(err.exit_code)
