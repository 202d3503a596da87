"""Start-up shared by the entry points: connect to (or start) Ray, validate against what the cluster
can offer, run the driver actor, tear everything down so Hydra multirun points don't leak actors."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from apo_ray.config import Config, validate

log = logging.getLogger(__name__)


def connect_ray(cfg: Config) -> bool:
    """Connect to ``cluster.address``, to the cluster of a submitted job (``RAY_ADDRESS``), or to a
    cluster started with ``ray start`` on this machine; else start a local instance. Returns True
    when this call started Ray (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.cluster.address, log_to_driver=True)
        return True
    try:
        ray.init(address="auto", log_to_driver=True)
    except ConnectionError:
        ray.init(num_cpus=cfg.cluster.local_num_cpus, log_to_driver=True)
    return True


def run_namespace(cfg: Config) -> str:
    if cfg.cluster.namespace:
        return cfg.cluster.namespace
    digest = hashlib.sha1(str(Path(cfg.run.output_dir).resolve()).encode()).hexdigest()[:8]
    return f"apo-{cfg.run.name}-{digest}"


def run_on_ray(cfg: Config) -> list[dict]:
    import ray

    from apo_ray.driver import DRIVER_NAME, APODriver

    started = connect_ray(cfg)
    try:
        resources = ray.cluster_resources()
        validate(cfg, cluster_cpus=resources.get("CPU", 0.0), cluster_gpus=resources.get("GPU", 0.0))
        namespace = run_namespace(cfg)
        driver = ray.remote(APODriver).options(
            name=DRIVER_NAME, namespace=namespace, num_cpus=cfg.cluster.driver_cpus, max_concurrency=8,
        ).remote(cfg, namespace)
        log.info("driver actor %s in namespace %s; output in %s", DRIVER_NAME, namespace, cfg.run.output_dir)
        try:
            return ray.get(driver.run.remote())
        finally:
            ray.kill(driver)
    finally:
        if started:
            ray.shutdown()


def run_in_process(cfg: Config) -> list[dict]:
    from apo_ray.game import APOGame, PhaseStore, build_game_data, finish_run
    from apo_ray.local import LocalSystem

    validate(cfg)
    out = Path(cfg.run.output_dir)
    phases = out / "phases"
    if phases.exists() and any(phases.iterdir()) and not cfg.run.resume:
        raise RuntimeError(f"{phases} holds phases of an earlier run; pass run.resume=true to continue it "
                           f"or choose another run.output_dir")
    start = time.perf_counter()
    system = LocalSystem(cfg)
    game = APOGame(cfg, system, build_game_data(cfg), PhaseStore(phases, system))
    records = game.run()
    finish_run(cfg, game, records, wall_seconds=time.perf_counter() - start)
    return records
