"""A whole run on a system (in process or on Ray): the data, the phase store, the game, its observer,
then the run's files. The one place where the game meets what watches it."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

from apo_ray.config import Config
from apo_ray.game.events import GameEvent, RoundRecord
from apo_ray.game.game_data import GameData, build_game_data
from apo_ray.game.loop import APOGame
from apo_ray.game.store import open_store
from apo_ray.game.system import GameSystem
from apo_ray.outputs.observer import RunObserver
from apo_ray.outputs.summary import finish_run


def play_game(cfg: Config, system: GameSystem, on_event: Callable[[GameEvent], None] | None = None,
              data: GameData | None = None) -> list[RoundRecord]:
    """A whole run on ``system`` (in process or on Ray): the data, the phase store (resuming what an
    earlier run of the same settings finished), every round of every arm, then ``summary.json`` and
    the report. ``data``: the game's data when the caller built it already (else built here). Every game event goes to the run's observer (progress lines with the run's ETA,
    trackers, model export: :mod:`apo_ray.outputs.observer`) and to ``on_event``. The system is shut down
    at the end, also when a phase fails."""
    start, cpu_start = time.perf_counter(), _process_cpu_seconds()
    try:
        data = data if data is not None else build_game_data(cfg)
        store = open_store(cfg, system)
        with RunObserver(cfg, store, data) as observer:

            def each_event(event: GameEvent) -> None:
                observer.on_event(event)
                if on_event is not None:
                    on_event(event)

            game = APOGame(cfg, system, data, store, on_event=each_event)
            records = game.run()
            finish_run(cfg, game, records, wall_seconds=time.perf_counter() - start,
                       cpu_seconds=_process_cpu_seconds() - cpu_start)
    finally:
        system.shutdown()
    return records


def _process_cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (in process: the whole game's work)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
