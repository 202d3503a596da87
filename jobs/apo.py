"""APO (RM-LLM game) on Ray: `python jobs/apo.py experiment=demo`, or submitted to a cluster with
`ray job submit --working-dir . -- python jobs/apo.py experiment=paper_hh run.output_dir=/shared/x`.
Sweeps: `python jobs/apo.py -m apo.beta2=1,10 rm.lr=1e-8,1e-7`. See README.md."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import get_original_cwd, to_absolute_path
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from apo_ray.config import from_omegaconf, register_configs, validate
from apo_ray.data import DataError, resolve_paths
from apo_ray.game.ownership import os_cause
from apo_ray.runtime.launch import USER_ERRORS, run_in_process, run_on_ray

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(node: DictConfig) -> None:
    try:
        cfg = from_omegaconf(node)
    except (OmegaConfBaseException, ValueError) as err:  # names the bad key; say it plainly and stop
        raise SystemExit(f"config error: {err}") from None
    logging.basicConfig(level=cfg.run.log_level, format="%(asctime)s %(name)s: %(message)s", force=True)
    # Relative paths are the user's, from where the command was started; checked before any work.
    try:
        resolve_paths(cfg, get_original_cwd())
    except DataError as err:
        raise SystemExit(f"config error: {err}") from None
    cfg.run.output_dir = to_absolute_path(cfg.run.output_dir)
    try:
        validate(cfg)  # the cheap checks before any cluster is touched; pool sizes are checked on it
        records = run_in_process(cfg) if cfg.run.in_process else run_on_ray(cfg)
    except USER_ERRORS as err:  # the message names the field, file or resource at fault
        raise SystemExit(str(err)) from None
    except OSError as err:  # disk full, permission denied, not a regular file: the cause and the path
        raise SystemExit(f"error: {os_cause(err)} (run.output_dir={cfg.run.output_dir})") from None
    logging.getLogger("apo").info("finished %d records; summary in %s/summary.json", len(records),
                                  cfg.run.output_dir)


if __name__ == "__main__":
    main()
