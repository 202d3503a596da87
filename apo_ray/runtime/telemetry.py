"""Progress for the Ray dashboard (``ray.util.metrics``, exported to Prometheus when the cluster
exports metrics). Fed by the game's phase events; the log line per phase comes from
:mod:`apo_ray.outputs.observer`. :func:`object_store_usage` reads what the cluster's object stores hold."""

from __future__ import annotations

import gc
import logging

from apo_ray.game.events import ArmRoundFinished, GameEvent, RoundFinished

log = logging.getLogger(__name__)


def object_store_usage(stable_s: float = 2.0, max_wait_s: float = 8.0) -> dict[str, float]:
    """The bytes and objects in the object stores of every node of the connected cluster now (what
    ``ray memory --stats-only`` prints: Ray's ``internal_api`` asks one raylet, which gathers every
    node's plasma store stats). ``{}`` when Ray cannot tell (logged).

    A reference dropped just before the call is released asynchronously: its object's owner (often
    another process, e.g. learner rank 0) frees it when the borrowers report back, which was seen
    to take about a second on a busy machine. So after a garbage collection the stats are read every 0.25 s
    until they have not changed for ``stable_s`` (at most ``max_wait_s``)."""
    import time

    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    def read():
        return get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats

    gc.collect()
    try:
        start = time.monotonic()
        stats, since = read(), start
        while time.monotonic() - since < stable_s and time.monotonic() - start < max_wait_s:
            time.sleep(0.25)
            again = read()
            if (again.object_store_bytes_used, again.num_local_objects) != (
                    stats.object_store_bytes_used, stats.num_local_objects):
                stats, since = again, time.monotonic()
    except Exception as exc:  # noqa: BLE001 - a metric must never stop a run
        log.warning("cannot read the object store's usage: %s: %s", type(exc).__name__, exc)
        return {}
    return {"object_store_bytes": float(stats.object_store_bytes_used),
            "object_store_objects": float(stats.num_local_objects),
            "object_store_primary_bytes": float(stats.object_store_bytes_primary_copy),
            "object_store_capacity_bytes": float(stats.object_store_bytes_avail),
            "object_store_spilled_bytes": float(stats.spilled_bytes_total)}


class APOMetrics:
    def __init__(self, run_name: str):
        from ray.util.metrics import Counter, Gauge

        tags = ("run", "arm")
        self.default_tags = {"run": run_name}
        self.round = Gauge("apo_round", "Current APO round", tag_keys=tags)
        self.phase_seconds = Gauge("apo_phase_seconds", "Wall seconds of the last phase", tag_keys=tags + ("phase",))
        self.phases_done = Counter("apo_phases_done", "Finished phases", tag_keys=tags + ("phase",))
        self.samples = Counter("apo_samples_generated", "Sequences sampled from the policy", tag_keys=tags)
        self.samples_per_s = Gauge("apo_samples_per_s", "Generation throughput, sequences/s", tag_keys=tags)
        self.tokens_per_s = Gauge("apo_generated_tokens_per_s", "Generation throughput, new tokens/s", tag_keys=tags)
        self.rm_acc = Gauge("apo_rm_accuracy", "RM preference accuracy", tag_keys=tags + ("split",))
        self.rm_ece = Gauge("apo_rm_ece", "RM expected calibration error (weighted)", tag_keys=tags + ("split",))
        self.mean_reward = Gauge("apo_policy_mean_reward", "Evaluation-RM score of the policy's test answers",
                                 tag_keys=tags)
        self.sync_seconds = Gauge("apo_weight_sync_seconds", "Seconds pool actors spent loading new weights",
                                  tag_keys=tags)
        self.sync_bytes = Counter("apo_weight_sync_bytes", "Bytes of weights loaded by pool actors", tag_keys=tags)
        self.object_store_bytes = Gauge("apo_object_store_bytes", "Bytes in the cluster's object stores after a round",
                                        tag_keys=("run",))
        self.live_versions = Gauge("apo_live_model_versions", "Model versions the run holds after a round",
                                   tag_keys=("run",))

    def on_event(self, event: GameEvent) -> None:
        """Export one event of the game (:mod:`apo_ray.game.events`)."""
        run = {"run": self.default_tags["run"]}
        if isinstance(event, RoundFinished):
            if "object_store_bytes" in event.usage:
                self.object_store_bytes.set(event.usage["object_store_bytes"], tags=run)
            self.live_versions.set(len(event.live_versions), tags=run)
            return
        tags = run | {"arm": str(event.arm or "setup")}
        if event.round is not None:
            self.round.set(event.round, tags=tags)
        if isinstance(event, ArmRoundFinished):
            record = event.record
            for split in ("dev", "test"):
                if f"rm_{split}_acc" in record:
                    self.rm_acc.set(record[f"rm_{split}_acc"], tags=tags | {"split": split})
                    self.rm_ece.set(record[f"rm_{split}_ece"], tags=tags | {"split": split})
            self.mean_reward.set(record["policy_mean_reward"], tags=tags)
            return
        phase, generation = event.phase, event.generation
        self.phase_seconds.set(event.seconds, tags=tags | {"phase": phase})
        self.phases_done.inc(1, tags=tags | {"phase": phase})
        if phase.startswith("sample") and generation:
            self.samples.inc(generation["sequences"], tags=tags)
            self.samples_per_s.set(generation["samples_per_s"], tags=tags)
            self.tokens_per_s.set(generation["tokens_per_s"], tags=tags)
        if generation and generation.get("sync_bytes"):
            self.sync_seconds.set(generation["sync_seconds"], tags=tags)
            self.sync_bytes.inc(generation["sync_bytes"], tags=tags)
