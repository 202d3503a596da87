"""The phases a run will compute, in order, before it computes any: for progress lines and the ETA.

The game describes its phases by playing itself with :class:`PlanningSystem`, a system that computes
nothing and answers with values of the right shape, against an in-memory store: ``APOGame`` then
walks exactly the phases the real run will compute (arms that share a phase share it here too), in
order, in milliseconds. One definition of the round (``loop.py``) serves both, so the plan cannot
drift from what runs.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from apo_ray.game import loop
from apo_ray.game.events import GameEvent, PhaseFinished
from apo_ray.game.store import PhaseStore
from apo_ray.game.system import Generated, Weights


class PlanningSystem:
    """A GameSystem that does no work: distinct placeholder samples (so every objective finds its
    example), increasing scores, training returns no weights. Only for walking the game's phases
    (see the module docstring)."""

    def generate(self, policy, prompts, n, *args, **kwargs):
        return Generated([[f"sample {j}" for j in range(n)] for _ in prompts],
                         {"sequences": len(prompts) * n, "new_tokens": 0})

    def score(self, rm, prompts, responses, *args, **kwargs):
        return [float(i) for i in range(len(responses))]

    def train(self, job, init, data):
        return None, {}

    def save_weights(self, handle, path, **checkpoint) -> None:
        pass

    def load_weights(self, path):
        return None

    def resource_usage(self) -> dict:
        return {}

    def shutdown(self) -> None:
        pass


def plan_phases(cfg, data) -> list[dict]:
    """The phases a fresh run of ``cfg`` on ``data`` computes, in order: ``[{"phase", "key", ...}]``."""
    class MemoryStore(PhaseStore):
        def __init__(self):
            self.values: dict[str, Any] = {}

        def get(self, key):
            return self.values.get(key)

        def put(self, key, value):
            self.values[key] = value

        def get_version(self, key):
            return Weights(key) if key in self.values else None

        def put_version(self, key, handle, stats, **checkpoint):
            self.values[key] = stats
            return Weights(key, handle)

    planned: list[dict] = []

    def on_event(event: GameEvent) -> None:
        if isinstance(event, PhaseFinished):
            planned.append({"phase": event.phase, "key": event.key, "round": event.round, "arm": event.arm})

    game_log = logging.getLogger(loop.__name__)
    with _silenced(game_log):
        loop.APOGame(cfg, PlanningSystem(), data, MemoryStore(), on_event=on_event).run()
    return planned


@contextlib.contextmanager
def _silenced(logger: logging.Logger):
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was
