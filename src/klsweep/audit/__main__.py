"""``python -m klsweep.audit [overrides]``: the KL-gradient audit of the run the same
overrides configure. The command line is checked (the run's keys as training checks them,
then ``audit.*``) before Hydra creates the run dir; a bad value fails in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from klsweep.audit.config import check, compose_audit
from klsweep.config import CONF_DIR, ConfigError


@hydra.main(config_path=str(CONF_DIR), config_name="audit", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    import torch

    from klsweep.audit.output import wandb_table, write
    from klsweep.audit.run import audit

    config = check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = audit(cfg, config)
    write(result, run_dir)
    if cfg.logger.get("_target_") is not None:
        result["wandb_dir"] = wandb_table(result, run_dir,
                                          OmegaConf.to_container(cfg, resolve=True))
    print(f"klsweep.audit: {len(result['rows'])} rows by {result['method']} → "
          f"{run_dir / 'audit.md'}")


def main() -> None:
    args = sys.argv[1:]
    if not {"--help", "-h", "--cfg", "-c", "--info", "--hydra-help"}.intersection(args):
        try:
            compose_audit(args)
        except ConfigError as err:
            print(f"klsweep.audit: error: {err}", file=sys.stderr)
            sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
