"""The driver: owns a run on Ray (its system of actors, the phase store, the metrics) and plays it.

A plain class; :func:`apo_ray.runtime.launch.run_on_ray` makes it the named actor ``apo-driver`` in the
run's namespace, so ``ray list actors`` and the dashboard show it and ``status()`` answers while
``run()`` plays.
"""

from __future__ import annotations

import logging

from apo_ray.config import Config
from apo_ray.game.events import GameEvent
from apo_ray.game.game_data import GameData
from apo_ray.runtime.play import play_game
from apo_ray.runtime.ray_system import RaySystem
from apo_ray.runtime.telemetry import APOMetrics

DRIVER_NAME = "apo-driver"


class APODriver:
    def __init__(self, cfg: Config, namespace: str | None = None, data: GameData | None = None):
        logging.basicConfig(level=cfg.run.log_level, format="%(asctime)s %(name)s: %(message)s", force=True)
        self.cfg, self.namespace, self.data = cfg, namespace, data  # data: built by the launcher's preflight
        self._progress: dict = {"state": "created"}

    def status(self) -> dict:
        return dict(self._progress)

    def run(self) -> list[dict]:
        metrics = APOMetrics(self.cfg.run.name)

        def on_event(event: GameEvent) -> None:
            metrics.on_event(event)
            self._progress = {"state": "running", "event": type(event).__name__, "round": event.round,
                              "arm": getattr(event, "arm", None), "phase": getattr(event, "phase", None)}

        self._progress = {"state": "starting"}
        records = play_game(self.cfg, RaySystem(self.cfg, namespace=self.namespace), on_event=on_event,
                            data=self.data)
        self._progress = {"state": "finished", "records": len(records)}
        return records
