"""The driver: owns a run on Ray (its system of actors, the phase store, the metrics) and plays it.

A plain class; :func:`apo_ray.launch.run_on_ray` makes it the named actor ``apo-driver`` in the
run's namespace, so ``ray list actors`` and the dashboard show it and ``status()`` answers while
``run()`` plays.
"""

from __future__ import annotations

import logging

from apo_ray.config import Config
from apo_ray.game import play_game

DRIVER_NAME = "apo-driver"


class APODriver:
    def __init__(self, cfg: Config, namespace: str | None = None):
        logging.basicConfig(level=cfg.run.log_level, format="%(asctime)s %(name)s: %(message)s", force=True)
        self.cfg, self.namespace = cfg, namespace
        self._progress: dict = {"state": "created"}

    def status(self) -> dict:
        return dict(self._progress)

    def run(self) -> list[dict]:
        from apo_ray.ray_system import RaySystem
        from apo_ray.telemetry import APOMetrics

        metrics = APOMetrics(self.cfg.run.name)

        def on_phase(event: dict) -> None:
            metrics.on_phase(event)
            self._progress = {"state": "running", **{k: v for k, v in event.items() if k != "record"}}

        self._progress = {"state": "starting"}
        records = play_game(self.cfg, RaySystem(self.cfg, namespace=self.namespace), on_phase=on_phase)
        self._progress = {"state": "finished", "records": len(records)}
        return records
