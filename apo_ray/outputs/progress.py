"""Progress of a run for a person: one line per phase with its rate and the run's ETA.

The plan is the game's own list of its phases (:func:`apo_ray.game.plan.plan_phases`); phases
already in the run's store (a resumed run) count as done.

The ETA sums, over the phases still to run, the mean seconds of finished phases of the same name
(the mean over all finished phases for a name not seen yet): learner phases cost far more than
scoring ones, so a plain done/planned ratio would mislead.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from apo_ray.game.events import PhaseFinished

log = logging.getLogger("apo_ray.outputs.progress")

# Events whose phase name says what was counted in "sequences" (for the rate in the line).
_RATE_UNITS = {"sample": "samples/s", "score": "scores/s", "evaluate": "items/s"}


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class RunProgress:
    """Counts finished phases against the plan and formats the per-phase line.

    ``planned``: from :func:`apo_ray.game.plan.plan_phases`; ``done_keys``: keys already in the store (resume)."""

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

    def on_phase(self, event: PhaseFinished, count: int | None = None, unit: str = "") -> str:
        """Record a finished phase; return its progress line."""
        seconds = float(event.seconds)
        self.remaining.pop(event.key, None)
        self.seconds_by_name[event.phase].append(seconds)
        where = f"round {event.round} arm {event.arm}" if event.round is not None else "setup"
        line = f"[{self.done}/{self.total}] {where}: {event.phase} {seconds:.1f}s"
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
