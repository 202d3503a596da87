"""Progress for the Ray dashboard (``ray.util.metrics``, exported to Prometheus when the cluster
exports metrics). Fed by the game's phase events; the log line per phase comes from
:mod:`apo_ray.observer`."""

from __future__ import annotations


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

    def on_phase(self, event: dict) -> None:
        """Export one phase event of the game (``game.APOGame.on_phase``); sampling phases carry
        their generation stats under ``"generation"``."""
        tags = {"run": self.default_tags["run"], "arm": str(event.get("arm", "setup"))}
        generation = event.get("generation")
        phase = event["phase"]
        if "round" in event:
            self.round.set(event["round"], tags=tags)
        if phase == "round_done":
            record = event["record"]
            for split in ("dev", "test"):
                if f"rm_{split}_acc" in record:
                    self.rm_acc.set(record[f"rm_{split}_acc"], tags=tags | {"split": split})
                    self.rm_ece.set(record[f"rm_{split}_ece"], tags=tags | {"split": split})
            self.mean_reward.set(record["policy_mean_reward"], tags=tags)
            return
        self.phase_seconds.set(event["seconds"], tags=tags | {"phase": phase})
        self.phases_done.inc(1, tags=tags | {"phase": phase})
        if phase.startswith("sample") and generation:
            self.samples.inc(generation["sequences"], tags=tags)
            self.samples_per_s.set(generation["samples_per_s"], tags=tags)
            self.tokens_per_s.set(generation["tokens_per_s"], tags=tags)
        if generation and generation.get("sync_bytes"):
            self.sync_seconds.set(generation["sync_seconds"], tags=tags)
            self.sync_bytes.inc(generation["sync_bytes"], tags=tags)
