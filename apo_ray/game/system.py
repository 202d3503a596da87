"""The GameSystem protocol: what Algorithm 1 needs from the machinery underneath, and its types.

A system generates, scores and trains model versions (:class:`Weights`); the game never sees how.
Two systems implement it: :class:`apo_ray.runtime.in_process.InProcessSystem` (one process) and
:class:`apo_ray.runtime.ray_system.RaySystem` (Ray actors). The batch helpers here let both cut a
call into the same seeded batches, so samples do not depend on how many actors share the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from apo_ray.config import DecodingConfig
from apo_ray.models.training import LearnerJob

PHASES = ("sample_gold", "train_rm", "sample_queries", "score_samples", "train_policy", "evaluate")


@dataclass(frozen=True)
class Weights:
    """A model version. ``id`` names it ("policy/apo/r2"); equal ids mean equal weights.
    ``handle`` is what the system moves around: a state dict in-process, an ObjectRef on Ray,
    ``None`` for the pretrained weights. ``checkpoint``: the file the version was saved to, from
    which a system can reload it when the handle is gone (e.g. its owner process died)."""

    id: str
    handle: Any = None
    checkpoint: str | None = None


@dataclass
class Generated:
    """What a generate call returns: ``samples[i][j]`` is the j-th sample for prompt i; ``stats``
    (sequences, new_tokens, seconds, samples_per_s, tokens_per_s, sync_seconds, sync_bytes) goes
    into the phase event for progress lines and metrics."""

    samples: list[list[str]]
    stats: dict[str, float] = field(default_factory=dict)


class GameSystem(Protocol):
    """What Algorithm 1 needs from the machinery underneath."""

    def generate(self, policy: Weights, prompts: list[str], n: int, seed: int,
                 decoding: DecodingConfig | None = None) -> Generated: ...

    def score(self, rm: Weights, prompts: list[str], responses: list[str]) -> list[float]: ...

    def train(self, job: LearnerJob, init: Weights, data: list) -> tuple[Any, dict]:
        """Run a learner job from ``init`` on ``data``: (handle of the trained weights, stats)."""

    def save_weights(self, handle: Any, path: Path, **checkpoint) -> None:
        """Checkpoint ``handle`` at ``path``: :func:`apo_ray.game.store.write_checkpoint`'s file
        (``checkpoint``: its keyword arguments, what the phase trained and from which version)."""

    def load_weights(self, path: Path) -> Any:
        """The handle of the version checkpointed at ``path`` (:func:`apo_ray.game.store.load_checkpoint`)."""

    def resource_usage(self) -> dict[str, float]:
        """What the system holds now, e.g. ``{"object_store_bytes": ...}`` on Ray; ``{}`` where there
        is nothing to report. Read after every round (the log line and the metrics)."""

    def shutdown(self) -> None: ...


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Item indices cut into batches of ``batch_size``, items of similar length together (little
    padding). The systems run each batch as one call, and sampling batch ``b`` is seeded with
    :func:`batch_seed`, so samples and scores do not depend on how many actors share the work."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of batch ``batch`` of a ``generate(..., seed)`` call."""
    return seed * 1009 + batch


def in_input_order(batches: list[list[int]], results: list[list]) -> list:
    """Per-item results of each batch put back in the order of the items."""
    out: list = [None] * sum(len(b) for b in batches)
    for batch, values in zip(batches, results):
        for i, value in zip(batch, values, strict=True):
            out[i] = value
    return out


def merge_generated(batches: list[list[int]], parts: list[Generated], seconds: float) -> Generated:
    """The generate call's result from its batches' results (``parts[k]`` answered ``batches[k]``):
    samples in prompt order, stats summed, rates over the call's wall ``seconds``."""
    sequences = sum(p.stats["sequences"] for p in parts)
    tokens = sum(p.stats["new_tokens"] for p in parts)
    return Generated(in_input_order(batches, [p.samples for p in parts]), {
        "sequences": sequences, "new_tokens": tokens, "seconds": seconds,
        "samples_per_s": sequences / max(seconds, 1e-9), "tokens_per_s": tokens / max(seconds, 1e-9),
        "sync_seconds": sum(p.stats["sync_seconds"] for p in parts),
        "sync_bytes": sum(p.stats["sync_bytes"] for p in parts)})


def generate_calls(prompts: list[str], n: int, seed: int, decoding: DecodingConfig | None,
                   prompts_per_batch: int) -> tuple[list[list[int]], list[tuple]]:
    """How every system cuts a generate call: batches of similar-length prompts, and for batch k the
    arguments ``(prompts, n, batch_seed(seed, k), decoding)`` of one generator call, so the samples
    are the same in one process and on any number of actors."""
    batches = batches_by_length([len(p) for p in prompts], prompts_per_batch)
    return batches, [([prompts[i] for i in b], n, batch_seed(seed, k), decoding) for k, b in enumerate(batches)]


def score_calls(prompts: list[str], responses: list[str], per_batch: int) -> tuple[list[list[int]], list[tuple]]:
    """How every system cuts a score call: batches of similar-length texts, the arguments
    ``(prompts, responses)`` of one scorer call each."""
    batches = batches_by_length([len(p) + len(r) for p, r in zip(prompts, responses)], per_batch)
    return batches, [([prompts[i] for i in b], [responses[i] for i in b]) for b in batches]

