"""The driver actor: owns the run (state, checkpoints, weights objects) and plays the rounds.

It is a named actor (``apo-driver`` in the run's namespace) so ``ray list actors`` and the dashboard
show it, and a threaded one: while ``run`` waits on a learner job, the learner workers take their jobs from it
and rank 0 hands the trained weights over (see :mod:`apo_ray.ray_system` on ownership).
"""

from __future__ import annotations

import logging
import time

import ray

from apo_ray.config import Config
from apo_ray.game import APOGame, build_game_data, finish_run, open_store
from apo_ray.observer import RunObserver
from apo_ray.ray_system import LearnerMailbox

DRIVER_NAME = "apo-driver"


class APODriver(LearnerMailbox):
    def __init__(self, cfg: Config, namespace: str | None = None):
        super().__init__()
        logging.basicConfig(level=cfg.run.log_level, format="%(asctime)s %(name)s: %(message)s", force=True)
        self.cfg, self.namespace = cfg, namespace
        self._progress: dict = {"state": "created"}
        self.system = None

    def status(self) -> dict:
        return dict(self._progress)

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        from apo_ray.ray_system import RaySystem
        from apo_ray.telemetry import APOMetrics

        cfg = self.cfg
        metrics = APOMetrics(cfg.run.name)
        me = ray.get_runtime_context().current_actor
        self.system = RaySystem(cfg, me, namespace=self.namespace)
        system = self.system

        start = time.perf_counter()
        self._progress = {"state": "loading data"}
        data, store = build_game_data(cfg), open_store(cfg, system)
        with RunObserver(cfg, store, data) as observer:

            def on_phase(event: dict) -> None:
                generation = system.last_generation if event["phase"].startswith("sample") else None
                metrics.on_phase(event, generation, system.last_sync)
                observer.on_phase(event, generation)
                self._progress = {"state": "running", **{k: v for k, v in event.items() if k != "record"}}

            game = APOGame(cfg, system, data, store, on_phase=on_phase)
            try:
                records = game.run()
            finally:
                system.shutdown()
            finish_run(cfg, game, records, wall_seconds=time.perf_counter() - start)
        self._progress = {"state": "finished", "records": len(records)}
        return records
