"""Progress of a run for a person: one line per phase with its rate and the run's ETA.

The plan: :func:`plan_phases` plays the game with :class:`PlanningSystem`, a system that computes
nothing and answers with values of the right shape, against an in-memory store. ``APOGame`` then
walks exactly the phases the real run will compute (arms that share a phase share it here too), in
order, in milliseconds. Phases already in the run's store (a resumed run) count as done.

The ETA sums, over the phases still to run, the mean seconds of finished phases of the same name
(the mean over all finished phases for a name not seen yet): learner phases cost far more than
scoring ones, so a plain done/planned ratio would mislead.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

log = logging.getLogger("apo_ray.progress")

# Events whose phase name says what was counted in "sequences" (for the rate in the line).
_RATE_UNITS = {"sample": "samples/s", "score": "scores/s", "evaluate": "items/s"}


class PlanningSystem:
    """A GameSystem that does no work: distinct placeholder samples (so every objective finds its
    example), increasing scores, training returns no weights. Only for walking the game's phases
    (see the module docstring)."""

    def generate(self, policy, prompts, n, *args, **kwargs):
        from apo_ray.game import Generated

        return Generated([[f"sample {j}" for j in range(n)] for _ in prompts],
                         {"sequences": len(prompts) * n, "new_tokens": 0})

    def score(self, rm, prompts, responses, *args, **kwargs):
        return [float(i) for i in range(len(responses))]

    def train(self, job, init, data):
        return None, {}

    def save_weights(self, handle, path) -> None:
        pass

    def load_weights(self, path):
        return None

    def resource_usage(self) -> dict:
        return {}

    def shutdown(self) -> None:
        pass


def plan_phases(cfg, data) -> list[dict]:
    """The phases a fresh run of ``cfg`` on ``data`` computes, in order: ``[{"phase", "key", ...}]``."""
    from apo_ray import game as game_module
    from apo_ray.game import APOGame, PhaseStore, Weights

    class MemoryStore(PhaseStore):
        def __init__(self):
            self.values: dict[str, Any] = {}

        def get(self, key):
            return self.values.get(key)

        def put(self, key, value):
            self.values[key] = value

        def get_weights(self, key):
            return Weights(key) if key in self.values else None

        def put_weights(self, key, handle, stats):
            self.values[key] = stats
            return Weights(key, handle)

        def has(self, key):
            return key in self.values

        def adopt_weights(self, key, source, source_key):
            self.values[key] = source.values.get(source_key)

    def shared(folder):
        """A shared evaluation RM another run already trained is not a phase of this one."""
        store = MemoryStore()
        if (folder / "rm.json").exists():
            store.values["rm"] = {}
        return store

    planned: list[dict] = []

    def on_phase(event: dict) -> None:
        if event["phase"] not in ("round_done", "round_end"):
            planned.append({k: v for k, v in event.items() if k in ("phase", "key", "round", "arm")})

    game_log = logging.getLogger(game_module.__name__)
    with _silenced(game_log):
        APOGame(cfg, PlanningSystem(), data, MemoryStore(), on_phase=on_phase, shared_store=shared).run()
    return planned


@contextlib.contextmanager
def _silenced(logger: logging.Logger):
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class RunProgress:
    """Counts finished phases against the plan and formats the per-phase line.

    ``planned``: from :func:`plan_phases`; ``done_keys``: keys already in the store (resume)."""

    def __init__(self, planned: list[dict], done_keys: set[str] = frozenset(), *, clock=time.monotonic):
        self.clock = clock
        self.start = clock()
        self.planned = planned
        self.remaining: dict[str, str] = {p["key"]: p["phase"] for p in planned if p["key"] not in done_keys}
        self.total = len(planned)
        self.seconds_by_name: dict[str, list[float]] = defaultdict(list)

    @property
    def done(self) -> int:
        return self.total - len(self.remaining)

    def eta_seconds(self) -> float | None:
        seen = [s for values in self.seconds_by_name.values() for s in values]
        if not seen:
            return None
        overall = sum(seen) / len(seen)

        def mean(name: str) -> float:
            values = self.seconds_by_name.get(name)
            return sum(values) / len(values) if values else overall

        return sum(mean(name) for name in self.remaining.values())

    def on_phase(self, event: dict, count: int | None = None, unit: str = "") -> str:
        """Record a finished phase; return its progress line."""
        seconds = float(event.get("seconds", 0.0))
        self.remaining.pop(event.get("key"), None)
        self.seconds_by_name[event["phase"]].append(seconds)
        where = f"round {event['round']} arm {event['arm']}" if "round" in event else "setup"
        line = f"[{self.done}/{self.total}] {where}: {event['phase']} {seconds:.1f}s"
        if count:
            line += f" ({count} {unit.split('/')[0]}, {count / max(seconds, 1e-9):.1f} {unit})"
        eta = self.eta_seconds()
        line += f" | run {100 * self.done / max(self.total, 1):.0f}% done, elapsed {format_seconds(self.clock() - self.start)}"
        line += f", ETA {format_seconds(eta)}" if eta is not None and self.remaining else ""
        return line

    def summary(self) -> dict:
        return {"phases_done": self.done, "phases_planned": self.total, "elapsed_s": self.clock() - self.start,
                "eta_s": self.eta_seconds() if self.remaining else 0.0}


def rate_unit(phase: str) -> str:
    return next((unit for prefix, unit in _RATE_UNITS.items() if phase.startswith(prefix)), "examples/s")


def store_done_keys(store, planned: list[dict]) -> set[str]:
    """Planned keys whose result is already in the phase store (a resumed run)."""
    return {p["key"] for p in planned if store.has(p["key"])}
